import json
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
TSV_HEAD = "category\theadline\ttext\turl\n"


@pytest.fixture(scope="session", autouse=True)
def securefpt_home(tmp_path_factory):
    """The operator's own folder (coordinator key, demo federation): a fresh one for the test session."""
    home = tmp_path_factory.mktemp("securefpt-home")
    saved = os.environ.get("SECUREFPT_HOME")
    os.environ["SECUREFPT_HOME"] = str(home)
    yield home
    if saved is None:
        os.environ.pop("SECUREFPT_HOME", None)
    else:
        os.environ["SECUREFPT_HOME"] = saved


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)


@pytest.fixture
def masakhanews_root() -> Path:
    if not (SHARED_DATA / "eng" / "dev.tsv").is_file():
        pytest.skip(f"MasakhaNEWS data not found at {SHARED_DATA} (set SECUREFPT_SHARED_DATA)")
    return SHARED_DATA


def make_masakhanews_like(root, languages, missing=(), sizes=None):
    """A small MasakhaNEWS-shaped tree (training rows 10, 14, 18, ... unless `sizes` says;
    evaluation rows 6, 7, 8, ...: every language a different count, so a leaked size shows);
    languages in `missing` have labels but no TSVs."""
    words = {"sports": "match goal coach", "politics": "vote election minister", "health": "hospital vaccine"}
    for li, lang in enumerate(languages):
        folder = root / lang
        folder.mkdir(parents=True)
        (folder / "labels.txt").write_text("\n".join(words), encoding="utf-8")
        if lang in missing:
            continue
        n_train = sizes[li] if sizes else 10 + 4 * li
        for split, n in (("test", n_train), ("dev", 6 + li)):
            rows = [TSV_HEAD]
            for i in range(n):
                label = list(words)[i % 3]
                rows.append(f'{label}\t{lang} news {i}\t"{words[label]} {i}\nmore text"\thttp://x/{i}\n')
            (folder / f"{split}.tsv").write_text("".join(rows), encoding="utf-8")
    return root


def tsv_cfg_overrides(root, languages) -> list[str]:
    return ["data.source=masakhanews_tsv", f"data.root={root}", f"data.languages=[{', '.join(languages)}]",
            "data.train_split=test", "data.eval_split=dev", "data.max_train_per_client=null"]


def quantization_bound(cfg, cohort: int, total_ratio: float) -> float:
    """Worst-case error per coordinate of a SecAgg+ average, from the protocol, not from securefpt:
    each node's stochastic rounding is off by less than one quantization step 2 C / Q on its
    weighted change; `cohort` of them are summed and divided by the total weight ratio
    sum_k |D_k| / max_weight."""
    step = 2 * cfg.secagg.clipping_range / cfg.secagg.quantization_range
    return cohort * step / total_ratio


def expected_predictions(run: Path, texts, artifact="prompt_encoder.safetensors"):
    """(label, probability) of each text, computed here from the run's saved artifact; and what
    the same model gives without it (so a predict that ignored the artifact would be caught)."""
    import torch

    from securefpt.experiment.loading import load_config
    from securefpt.learning.artifacts import load_arrays
    from securefpt.learning.modeling import build_model, set_trainable

    cfg = load_config(run / "config.yaml")
    labels = json.loads((run / "labels.json").read_text())
    model = build_model(cfg.model, cfg.peft, len(labels), cfg.seed)
    model.model.eval()
    enc = model.tokenizer(list(texts), truncation=True, max_length=model.max_text_tokens, padding=True,
                          return_tensors="pt")
    with torch.no_grad():
        untrained = torch.softmax(model.model(enc["input_ids"], enc["attention_mask"]), -1)
        set_trainable(model.model, load_arrays(run / artifact))
        trained = torch.softmax(model.model(enc["input_ids"], enc["attention_mask"]), -1)
    pick = lambda probs: [(labels[int(p.argmax())], float(p.max())) for p in probs]  # noqa: E731
    return pick(trained), pick(untrained)
