import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SECUREFPT_SHARED_DATA", ROOT.parent / "shared" / "data")) / "masakhanews"

# A tiny randomly initialised BERT built in code (MiniLM's tokenizer), small budgets.
TINY = [
    "model.name=builtin:tiny",
    "model.max_length=32",
    "peft.num_virtual_tokens=4",
    "data.max_train_per_client=12",
    "data.max_eval_per_client=10",
    "fl.batch_size=4",
    "fl.rounds=2",
]


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)


@pytest.fixture
def masakhanews_root() -> Path:
    if not (SHARED_DATA / "eng" / "dev.tsv").is_file():
        pytest.skip(f"MasakhaNEWS data not found at {SHARED_DATA} (set SECUREFPT_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture
def flower_task():
    """Messages built outside an engine need the process's Flower task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
