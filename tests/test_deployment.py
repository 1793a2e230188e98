"""Flower's deployment engine on loopback: a SuperLink and SuperNodes as separate processes.

Bounded in time, 127.0.0.1 only. Every connection is TLS; the SuperLink admits only
registered SuperNode keys; each SuperNode reads its institution's node.yaml (named in
its Flower node config) and proves its attested identity at setup. The same
ServerApp/ClientApp as the simulation engine, submitted with Flower's own `flwr run`;
results are compared with the simulation engine's for the same seed.
"""

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from securefpt.engines.loopback import BIN, EXPERIMENT, INSTITUTIONS, Loopback, kill_group
from securefpt.engines.simulation import run_federated_simulation
from securefpt.errors import FederationError
from securefpt.experiment.loading import load_config
from securefpt.learning.artifacts import load_arrays
from securefpt.operators.keys import make_node_key
from securefpt.protocol.attestation import new_key, save_private
from securefpt.protocol.audit import read_entries
from securefpt.protocol.records import encoder_hash
from tests.conftest import quantization_bound

pytestmark = pytest.mark.slow


@pytest.fixture
def loopback(tmp_path):
    try:
        fed = Loopback(tmp_path)
    except FederationError as exc:
        pytest.skip(str(exc))
    yield fed
    fed.stop()


def simulated(loopback: Loopback, out: Path, overrides: str = ""):
    cfg = load_config(EXPERIMENT, f"{loopback.overrides} {overrides}".split())
    return cfg, run_federated_simulation(cfg, out, show_progress=False), load_arrays(out / "prompt_encoder.safetensors")


def assert_within(deployed: dict, reference: dict, bound: float) -> None:
    for name in reference:
        assert np.abs(deployed[name] - reference[name]).max() <= bound, name


def test_authenticated_nodes_run_a_secure_federation_that_survives_a_coordinator_restart(loopback, tmp_path):
    """TLS, node authentication and identity proofs; the coordinator dies after round 1
    and the run resumes at round 2; the result equals the simulation engine's."""
    dp = "dp.enabled=true dp.target_epsilon=8"  # so the nodes' ledgers must carry across the restart
    loopback.start_superlink()
    ids = loopback.start_institutions()
    # a registered node configured with eng's manifest while holding another key
    impostor_key, impostor_pub = make_node_key(tmp_path / "impostor-node")
    ids["impostor"] = loopback.register(impostor_pub)
    config = yaml.safe_load((loopback.clients / "eng-newsroom" / "node.yaml").read_text())
    save_private(new_key(), tmp_path / "impostor.key")
    config.update(key=str(tmp_path / "impostor.key"), manifest=str(loopback.clients / "eng-newsroom" / "manifest.yaml"),
                  policy=str(loopback.federation / "policies" / "deployment.yaml"))
    (tmp_path / "impostor.yaml").write_text(yaml.safe_dump(config))
    loopback.start_node("impostor", impostor_key, tmp_path / "impostor.yaml")
    # a node whose key nobody registered
    rogue_key, _ = make_node_key(tmp_path / "rogue-node")
    rogue = loopback.start_node("rogue", rogue_key, loopback.clients / "fra-agence" / "node.yaml")
    assert rogue.wait(timeout=90) != 0
    assert "Failed to activate SuperNode" in loopback.log("rogue")
    loopback.wait_online(set(ids.values()))
    assert len(loopback.online()) == 5  # four institutions and the impostor; the rogue never joined

    out = tmp_path / "deployed"
    first = subprocess.Popen(loopback.run_args(out, dp), env=loopback.env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    state = out / "checkpoint" / "state.json"
    deadline = time.monotonic() + 900  # a hang guard, not a speed target: on two loaded cores, Flower's 3 s
    # polling and a fresh ClientApp process per message make round 1 (setup, eval 0, five SecAgg+ stages) take minutes
    while not (state.is_file() and json.loads(state.read_text())["completed"] >= 1):
        assert time.monotonic() < deadline, "round 1 did not complete:\n" + loopback.log("superlink")[-3000:]
        time.sleep(0.1)
    loopback.crash_coordinator()  # SuperLink, SuperExec and ServerApp: SIGKILL
    kill_group(first)
    assert not (out / "summary.json").exists()
    after_round_1 = encoder_hash(load_arrays(out / "checkpoint" / "round-0001.global.safetensors"))

    loopback.start_superlink()  # same database: the registered nodes reconnect by themselves
    loopback.wait_online(set(ids.values()))
    loopback.submit(out, dp, timeout=900)  # the same command again
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert [r["participants"] for r in summary["rounds"]] == [["eng", "fra", "hau", "swa"]] * 2
    assert summary["secure_aggregation"]["aborted_rounds"] == []
    entries = read_entries(out / "audit.jsonl")
    events = [e["event"] for e in entries]
    assert events.count("run_start") == 1 and events.count("run_resumed") == 1 and events.count("round") == 2
    verify = subprocess.run([str(BIN / "securefpt"), "audit", "verify", str(out / "audit.jsonl"), "--public-key",
                             str(loopback.clients / "keys" / "coordinator-audit.pub"), "--head", summary["audit_head"]],
                            capture_output=True, text=True)
    assert verify.returncode == 0 and "intact" in verify.stdout, verify.stdout + verify.stderr
    # each identity decision names the node id Flower authenticated; both runs decided alike.
    # The impostor's own node refuses to act on a key its attestation does not name: it fails
    # setup with a bare code (nothing about its files reaches the coordinator) and never acts for eng
    identity = [e for e in entries if e["event"] == "identity"]
    assert len(identity) == 8
    for e in identity:
        assert e["accepted"] and ids[e["language"]] == e["node"] and e["client"] == INSTITUTIONS[e["language"]]
    failed = [e["reason"] for e in entries if e["event"] == "node_failed_setup"]
    assert failed == ["node-error: the node failed; the details are in its local log"] * 2

    # every node's own records: round 2 of the new run trained on the checkpointed encoder, and its
    # ledger carried across the restart (two rounds in all: 12 rows at batch 4 is 3 Poisson steps a round)
    for lang, client in INSTITUTIONS.items():
        state_dir = tmp_path / "node-state" / lang / client
        runs = [json.loads(p.read_text()) for p in (state_dir / "runs").glob("*.json")]
        assert sorted(r["trained"] for r in runs) == [[1], [2]]
        assert next(r for r in runs if r["trained"] == [2])["offered"]["2"] == after_round_1
        ledger = json.loads((state_dir / "ledger-news-topic.json").read_text())
        assert sum(e["steps"] for e in ledger["entries"]) == 6
    # the whole run spent each node's target once, released as its rules say (one decimal)
    assert summary["privacy"]["epsilon"] == {lang: 8.0 for lang in INSTITUTIONS}


def test_a_supernode_killed_mid_round_leaves_the_survivors_to_finish(loopback, tmp_path, monkeypatch):
    loopback.start_superlink()
    # four nodes, threshold 3: one dropout is survivable. hau dies holding its masked update
    ids = loopback.start_institutions(faults={"hau": "hau@collect:kill-node"})
    loopback.wait_online(set(ids.values()))
    out = tmp_path / "deployed"
    loopback.submit(out, "fl.rounds=1")  # one round shows it (the restart test runs two)
    assert loopback.procs["hau"].poll() == -signal.SIGKILL  # the whole SuperNode is gone

    summary = json.loads((out / "summary.json").read_text())
    assert summary["secure_aggregation"]["rounds"] == [
        {"round": 1, "participants": ["eng", "fra", "swa"], "dropouts": ["hau"], "aborted": False}]
    assert summary["final"]["round"] == 1

    # the simulation engine, where hau fails at the same stage: the same sum
    monkeypatch.setenv("SECUREFPT_FAULTS", "hau@collect")
    cfg, _, reference = simulated(loopback, tmp_path / "simulated", "fl.rounds=1")
    bound = quantization_bound(cfg, cohort=3, total_ratio=3.0)
    assert_within(load_arrays(out / "prompt_encoder.safetensors"), reference, 2 * bound + 1e-6)
