"""A restarted coordinator resumes from the last completed round (simulation engine)."""

import json
import os
import subprocess
import sys

import pytest

from securefpt.engines.simulation import run_federated_simulation
from securefpt.errors import FederationError
from securefpt.learning.artifacts import load_arrays
from securefpt.protocol.attestation import load_public
from securefpt.protocol.audit import read_entries, verify_log
from securefpt.protocol.records import encoder_hash
from tests.test_privacy import dp_fed_cfg  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


class CoordinatorCrash(Exception):
    pass


@pytest.fixture
def crash_after_round(monkeypatch):
    """The coordinator dies right after it checkpointed round `completed` (before the next round
    reaches any node: a node that already trained on an encoder never trains on it again)."""
    import securefpt.coordinator.app as coordinator

    def arm(completed: int):
        real = coordinator.save_checkpoint

        def save_then_die(out_dir, cfg, state, key):
            path = real(out_dir, cfg, state, key)
            if state.completed >= completed:
                monkeypatch.setattr(coordinator, "save_checkpoint", real)  # the restarted one lives
                raise CoordinatorCrash(f"coordinator lost after round {completed}")
            return path

        monkeypatch.setattr(coordinator, "save_checkpoint", save_then_die)

    return arm


def test_a_run_resumed_after_round_1_continues_from_its_checkpoint_and_ledgers(
        dp_fed_cfg, tmp_path, crash_after_round):  # noqa: F811
    cfg = dp_fed_cfg("fl.rounds=2", "dp.target_epsilon=4", "secagg.enabled=false")
    out = tmp_path / "crashed"
    crash_after_round(1)
    with pytest.raises(CoordinatorCrash):
        run_federated_simulation(cfg, out, show_progress=False)
    assert not (out / "summary.json").exists()
    after_round_1 = encoder_hash(load_arrays(next((out / "checkpoint").glob("round-0001.global.safetensors"))))
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
    # ... and every node witnessed the heads of both runs: the same chain, continued
    check = subprocess.run([sys.executable, "-m", "securefpt.cli", "audit", "verify", str(out / "audit.jsonl"),
                            "--witness", str(out / "nodes")], capture_output=True, text=True)
    assert check.returncode == 0 and "3 witnesses agree up to entry" in check.stdout, check.stdout + check.stderr
    records = [json.loads(x) for lang in ("aa", "bb", "cc")
               for x in (out / "nodes" / lang / "witness.jsonl").read_text().splitlines()]
    assert len({r["run_id"] for r in records}) == 2  # witnessed in the crashed run and in the resumed one
    assert max(r["seq"] for r in records) == verdict.entries - 1  # up to the very last entry
    # every node trained round 2 of the new run on the checkpointed encoder (its own record)
    for lang in ("aa", "bb", "cc"):
        runs = [json.loads(p.read_text()) for p in (out / "nodes" / lang / "runs").glob("*.json")]
        assert len(runs) == 2 and sorted(r["trained"] for r in runs) == [[1], [2]]
        assert next(r for r in runs if r["trained"] == [2])["offered"]["2"] == after_round_1
    # the nodes' ledgers carried on: two rounds spent in all, the whole run's budget, as without a crash
    p = resumed["privacy"]
    for lang in ("aa", "bb", "cc"):
        assert p["steps"][lang] == 2 * int(1 / p["sample_rate"][lang])
        assert p["epsilon"][lang] == pytest.approx(4.0, rel=0.02)
    with pytest.raises(FederationError, match="finished run"):  # nothing overwritten
        run_federated_simulation(cfg, out, show_progress=False)


def test_ctrl_c_stops_at_the_next_exchange_and_the_same_command_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGINT right after round 1 is checkpointed (SECUREFPT_FAULTS plays the operator's Ctrl-C):
    one line, exit code 130, the checkpoint kept; the same command then finishes the run, and the
    result equals a run that was never interrupted (plaintext, no DP: training is deterministic)."""
    import numpy as np

    from tests.conftest import TINY, make_masakhanews_like, tsv_cfg_overrides

    root = make_masakhanews_like(tmp_path / "data", ["aa", "bb"])
    sets = [f"--set={s}" for s in
            TINY + tsv_cfg_overrides(root, ["aa", "bb"]) + ["fl.rounds=3", "secagg.enabled=false"]]
    command = lambda out: [sys.executable, "-m", "securefpt.cli", "run", "--quiet", "--out", str(out), *sets,  # noqa
                           str(tmp_path / "exp.yaml")]
    (tmp_path / "exp.yaml").write_text("name: interrupted\n")
    env = {**os.environ, "SECUREFPT_FAULTS": "coordinator@round-1:sigint"}
    stopped = subprocess.run(command(tmp_path / "run"), capture_output=True, text=True, env=env, timeout=600)
    assert stopped.returncode == 130, stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == (f"interrupted: {tmp_path / 'run'} keeps its checkpoint after "
                                                       "round 1; run the same command to resume")
    assert "Traceback" not in stopped.stderr and not (tmp_path / "run" / "summary.json").exists()
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["completed"] == 1
    resumed = subprocess.run(command(tmp_path / "run"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    whole = subprocess.run(command(tmp_path / "whole"), capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("run", "whole"))
    assert [r["round"] for r in a["rounds"]] == [1, 2, 3] and a["final"]["accuracy"] == b["final"]["accuracy"]
    x, y = (load_arrays(tmp_path / d / "prompt_encoder.safetensors") for d in ("run", "whole"))
    assert all(np.array_equal(x[k], y[k]) for k in y)


def _cli(tmp_path, languages, extra):
    """`securefpt run` on a small MasakhaNEWS-like tree, as a command line for a run directory."""
    from tests.conftest import TINY, make_masakhanews_like, tsv_cfg_overrides

    root = make_masakhanews_like(tmp_path / "data", languages)
    sets = [f"--set={s}" for s in TINY + tsv_cfg_overrides(root, languages) + extra]
    (tmp_path / "exp.yaml").write_text("name: interrupted\n")
    return lambda out: [sys.executable, "-m", "securefpt.cli", "run", "--quiet", "--out", str(out), *sets,
                        str(tmp_path / "exp.yaml")]


def _node_files(out, lang):
    state = out / "nodes" / lang
    runs = sorted((json.loads(p.read_text()) for p in (state / "runs").glob("*.json")),
                  key=lambda r: min(r["trained"] or [99]))
    held = json.loads((state / "held.json").read_text()) if (state / "held.json").is_file() else {}
    return runs, json.loads((state / "encoders.json").read_text()), held


def test_ctrl_c_after_the_aggregate_resumes_by_evaluating_it_and_no_node_trains_that_round_again(tmp_path):
    """The interrupt lands after round 2's aggregate is checkpointed, before its evaluation (the
    issue's 'round 34: evaluating'). The same command evaluates that aggregate, trains round 3 only,
    and ends equal to an uninterrupted run (plaintext, no DP: deterministic)."""
    import numpy as np

    command = _cli(tmp_path, ["aa", "bb"], ["fl.rounds=3", "secagg.enabled=false"])
    env = {**os.environ, "SECUREFPT_FAULTS": "coordinator@round-2:aggregated:sigint"}
    stopped = subprocess.run(command(tmp_path / "run"), capture_output=True, text=True, env=env, timeout=600)
    assert stopped.returncode == 130, stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"interrupted: {tmp_path / 'run'} keeps its checkpoint after round 1 (round 2 is aggregated; its evaluation "
        "is redone); run the same command to resume")
    resumed = subprocess.run(command(tmp_path / "run"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after round 1 (round 2 aggregated)" in resumed.stderr
    whole = subprocess.run(command(tmp_path / "whole"), capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("run", "whole"))
    assert [r["round"] for r in a["rounds"]] == [1, 2, 3] and a["final"]["accuracy"] == b["final"]["accuracy"]
    assert [r["accuracy"] for r in a["rounds"]] == [r["accuracy"] for r in b["rounds"]]
    x, y = (load_arrays(tmp_path / d / "prompt_encoder.safetensors") for d in ("run", "whole"))
    assert all(np.array_equal(x[k], y[k]) for k in y)
    for lang in ("aa", "bb"):  # rounds 1 and 2 in the first run, round 3 in the second; 3 encoders spent
        runs, spent, _ = _node_files(tmp_path / "run", lang)
        assert [r["trained"] for r in runs] == [[1, 2], [3]] and len(set(spent)) == 3
    verdict = verify_log(tmp_path / "run" / "audit.jsonl", load_public(a["audit_public_key"]), a["audit_head"])
    assert verdict.ok, verdict.reason


@pytest.mark.parametrize("stage, signal_name, first_run", [("collect_masked_vectors", "sigint", [1]),
                                                          ("unmask", "sigkill", [1, 2])])
def test_ctrl_c_inside_a_secure_round_resumes_and_the_nodes_train_that_round_once_more(tmp_path, stage, signal_name,
                                                                                       first_run):
    """Interrupted before a SecAgg+ stage of round 2 (by Ctrl-C, or by a crash: SIGKILL, nothing
    cleaned up, the audit log's lock left behind). Before collect, no node has trained round 2.
    Before unmask, every node trained on round 2's encoder, but none revealed unmask shares, so no
    sum with their updates could be unmasked: each held that encoder (node/state.py) and trains
    round 2 again in the resumed run; then it is spent, like every other."""
    command = _cli(tmp_path, ["aa", "bb", "cc"], ["fl.rounds=3", "secagg.enabled=true"])
    env = {**os.environ, "SECUREFPT_FAULTS": f"coordinator@round-2:{stage}:{signal_name}"}
    stopped = subprocess.run(command(tmp_path / "run"), capture_output=True, text=True, env=env, timeout=600)
    assert stopped.returncode == {"sigint": 130, "sigkill": -9}[signal_name], stopped.stderr
    for lang in ("aa", "bb", "cc"):
        runs, spent, held = _node_files(tmp_path / "run", lang)
        assert runs[0]["trained"] == first_run and len(spent) == 1  # round 2's encoder is not spent
        assert list(held.values()) == ([{"round": 2, "attempts": 1}] if 2 in first_run else [])
    resumed = subprocess.run(command(tmp_path / "run"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert all(r["participants"] == ["aa", "bb", "cc"] for r in summary["rounds"])
    assert summary["secure_aggregation"]["aborted_rounds"] == []
    for lang in ("aa", "bb", "cc"):
        runs, spent, held = _node_files(tmp_path / "run", lang)
        assert [r["trained"] for r in runs] == [first_run, [2, 3]] and len(set(spent)) == len(spent) == 3
        assert held == {}
    verdict = verify_log(tmp_path / "run" / "audit.jsonl", load_public(summary["audit_public_key"]),
                         summary["audit_head"])
    assert verdict.ok, verdict.reason


def test_a_node_never_trains_again_on_an_encoder_whose_unmask_shares_it_revealed(tmp_path):
    """The bound of the retry: once a node answered the unmask stage on an encoder (the sum with
    its update could be unmasked), it refuses that encoder for good, in any run and any round."""
    from securefpt.node.state import MAX_ATTEMPTS, NodeState

    state = NodeState(tmp_path)
    state.hold_encoder("e1", 2)
    assert state.may_train("e1", 2) and not state.may_train("e1", 3)  # its own round only
    for _ in range(MAX_ATTEMPTS - 1):
        state.hold_encoder("e1", 2)
    assert not state.may_train("e1", 2)  # a bounded number of attempts
    state.hold_encoder("e2", 4)
    state.record_encoder("e2")  # it revealed its unmask shares
    assert state.trained_on("e2") and not state.may_train("e2", 4)
    assert "e2" not in json.loads((tmp_path / "held.json").read_text())


def test_a_run_every_node_declines_to_finish_says_so_and_exits_non_zero(tmp_path):
    """Fixed noise sigma 1.5, batch 4, RDP: every node's budget (epsilon 2.8) affords one round and not
    two (aa 2.67 then 3.54, bb 2.48 then 3.21, cc 2.27 then 2.90), so all decline round 2. The
    results of round 1 are kept (summary.json); the command says why it stopped and exits 3."""
    command = _cli(tmp_path, ["aa", "bb", "cc"], ["fl.rounds=2", "secagg.enabled=false", "dp.enabled=true",
                                                  "dp.noise_multiplier=1.5", "dp.target_epsilon=2.8",
                                                  "dp.accountant=rdp"])
    done = subprocess.run(command(tmp_path / "run"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 3, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the run stopped before its last round: round 2: every node declined (budget-")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1] and summary["stopped_by_refusals"] is True
