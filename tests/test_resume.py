"""A restarted coordinator resumes from the last completed round (simulation engine)."""

import json

import numpy as np
import pytest

from securefpt.attestation import load_public
from securefpt.audit import read_entries, verify_log
from securefpt.errors import FederationError
from securefpt.results import load_arrays
from securefpt.simulation import run_federated_simulation
from tests.test_privacy import dp_fed_cfg  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


class CoordinatorCrash(Exception):
    pass


def crash_after_round(out, completed: int):
    """An `on_receive` hook that kills the run once round `completed` is checkpointed."""

    def hook(_msg):
        state = out / "checkpoint" / "state.json"
        if state.is_file() and json.loads(state.read_text())["completed"] >= completed:
            raise CoordinatorCrash(f"coordinator lost after round {completed}")

    return hook


def test_a_run_resumed_after_round_1_equals_the_uninterrupted_run_and_nothing_is_overwritten(dp_fed_cfg, tmp_path):  # noqa: F811
    cfg = dp_fed_cfg("fl.rounds=2", "dp.target_epsilon=4", "secagg.enabled=false")
    whole = run_federated_simulation(cfg, tmp_path / "whole", show_progress=False)

    out = tmp_path / "crashed"
    with pytest.raises(CoordinatorCrash):
        run_federated_simulation(cfg, out, show_progress=False, on_receive=crash_after_round(out, 1))
    assert not (out / "summary.json").exists()
    other = dp_fed_cfg("fl.rounds=3", "dp.target_epsilon=4", "secagg.enabled=false")
    with pytest.raises(FederationError, match="checkpoint of a different experiment"):
        run_federated_simulation(other, out, show_progress=False)
    resumed = run_federated_simulation(cfg, out, show_progress=False)

    assert [r["round"] for r in resumed["rounds"]] == [1, 2]  # round 1 kept, not repeated
    entries = read_entries(out / "audit.jsonl")
    events = [e["event"] for e in entries]
    assert events.count("run_start") == 1 and events.count("run_resumed") == 1
    assert [e["round"] for e in entries if e["event"] == "round"] == [1, 2]
    assert next(e for e in entries if e["event"] == "run_resumed")["after_round"] == 1
    verdict = verify_log(out / "audit.jsonl", load_public(resumed["audit_public_key"]), resumed["audit_head"])
    assert verdict.ok, verdict.reason
    # the clients' ledgers carried on: the same steps and epsilon as without the crash
    assert resumed["privacy"]["steps"] == whole["privacy"]["steps"]
    assert resumed["privacy"]["epsilon"] == pytest.approx(whole["privacy"]["epsilon"])
    a, b = load_arrays(out / "prompt_encoder.safetensors"), load_arrays(tmp_path / "whole" / "prompt_encoder.safetensors")
    for name in b:
        np.testing.assert_allclose(a[name], b[name], atol=1e-6, err_msg=name)
    assert resumed["final"]["accuracy"] == whole["final"]["accuracy"]
    with pytest.raises(FederationError, match="finished run"):  # nothing overwritten
        run_federated_simulation(cfg, out, show_progress=False)
