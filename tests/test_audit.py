"""The audit trail against the coordinator itself: pinned key, witnesses, one writer, torn writes, checkpoints."""

import json
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest

from securefpt.coordinator.audit_log import AuditLog
from securefpt.coordinator.checkpoint import RunState, load_checkpoint, save_checkpoint
from securefpt.engines.trial_nodes import write_trial_nodes
from securefpt.errors import FederationError
from securefpt.experiment.loading import load_config
from securefpt.node.config import load_node
from securefpt.node.witness import witness
from securefpt.protocol.attestation import new_key, save_private, save_public
from securefpt.protocol.audit import check_witnesses, load_witnesses, read_entries, verify_log
from securefpt.protocol.messages import AuditHead
from securefpt.protocol.refusals import NodeRefusal


@pytest.fixture
def log(tmp_path):
    key = new_key()
    save_public(key, tmp_path / "server.pub")
    audit = AuditLog(tmp_path / "audit.jsonl", key)
    for i in range(5):
        audit.append("round", round=i + 1, participants=["eng", "fra"], epsilon={"eng": 0.5 * i})
    audit.close()
    return tmp_path / "audit.jsonl", key, audit.head


def lines(path):
    return path.read_text().splitlines()


def write(path, rows):
    path.write_text("\n".join(rows) + "\n")


def resign(path, key, change=lambda entries: entries):
    """What a coordinator holding the key can do: rewrite the log and sign it all again."""
    entries = change([{k: v for k, v in e.items() if k not in ("seq", "time", "prev", "digest", "hash", "signature")}
                      for e in read_entries(path)])
    path.unlink()
    audit = AuditLog(path, key)
    for e in entries:
        audit.append(e.pop("event"), **e)
    audit.close()


def test_an_intact_log_verifies_and_a_restarted_writer_continues_its_chain(log):
    path, key, head = log
    verdict = verify_log(path, key.public_key(), head)
    assert verdict.ok and verdict.entries == 5 and verdict.head == head
    audit = AuditLog(path, key)  # a restarted coordinator verifies the chain, then continues it
    audit.append("run_end")
    audit.close()
    assert verify_log(path, key.public_key()).entries == 6


@pytest.mark.parametrize("tamper,line,why", [
    (lambda rows: rows[:2] + [rows[2].replace('"fra"', '"frb"')] + rows[3:], 3, "altered"),
    (lambda rows: rows[:1] + rows[2:], 2, "sequence"),
    (lambda rows: [rows[0], rows[2], rows[1], *rows[3:]], 2, "sequence"),
])
def test_every_edit_is_named(log, tamper, line, why):
    path, key, _ = log
    write(path, tamper(lines(path)))
    verdict = verify_log(path, key.public_key())
    assert not verdict.ok and verdict.bad_line == line and why in verdict.reason


def test_a_log_resigned_with_another_key_fails_against_the_pinned_key(log, tmp_path):
    path, key, _ = log
    resign(path, new_key(), lambda entries: [e for e in entries if e.get("round") != 3])
    verdict = verify_log(path, key.public_key())
    assert not verdict.ok and verdict.bad_line == 1 and "the wrong key, or a log re-signed" in verdict.reason


def test_a_log_resigned_with_the_pinned_key_is_caught_by_what_the_nodes_witnessed(log, tmp_path):
    path, key, _ = log
    node = load_node(write_trial_nodes(load_config(None, ["data.languages=[aa]"]), tmp_path / "nodes")[0])
    entries = read_entries(path)
    digests = [e["digest"] for e in entries]
    shown = AuditHead(entries[0]["hash"], 4, entries[4]["hash"], 0, digests)
    assert witness(node, 1, shown).seq == 4
    honest_records, problems = load_witnesses([tmp_path / "nodes"], entries[0]["hash"])
    assert problems == [] and check_witnesses(entries, honest_records) is None

    # the coordinator rewrites round 4 and re-signs everything with its own, pinned key
    resign(path, key, lambda es: [{**e, "participants": ["eng"]} if e.get("round") == 4 else e for e in es])
    assert verify_log(path, key.public_key()).ok  # the signatures alone cannot tell
    # (round 4 is entry 3; every later hash changes with it, so the witnessed head at 4 differs)
    assert "entry 4 is not the one node 'aa' witnessed" in check_witnesses(read_entries(path), honest_records)
    # ... or cuts the tail off
    resign(path, key, lambda es: es[:3])
    assert "witnessed entry 4, which the log does not have" in check_witnesses(read_entries(path), honest_records)


def test_a_node_refuses_a_head_that_does_not_extend_the_one_it_witnessed(log, tmp_path):
    path, _, _ = log
    node = load_node(write_trial_nodes(load_config(None, ["data.languages=[aa]"]), tmp_path / "nodes")[0])
    entries = read_entries(path)
    digests, log_id = [e["digest"] for e in entries], entries[0]["hash"]
    show = lambda seq, head, start, ds: AuditHead(log_id, seq, head, start, ds)  # noqa: E731
    witness(node, 1, show(2, entries[2]["hash"], 0, digests[:3]))
    witness(node, 1, show(4, entries[4]["hash"], 3, digests[3:]))  # an honest extension
    forked = digests[:2] + ["0" * 64] + digests[3:]
    for attempt in (show(4, entries[4]["hash"], 0, forked),  # a different entry 2 than witnessed
                    show(2, entries[2]["hash"], 0, digests[:3]),  # behind the witnessed head: truncated
                    show(5, "f" * 64, 5, ["a" * 64])):  # a head that is not the chain's
        with pytest.raises(NodeRefusal) as refusal:
            witness(node, 1, attempt)
        assert refusal.value.code == "audit-fork"
    records = [json.loads(x) for x in (node.state_dir / "witness.jsonl").read_text().splitlines()]
    assert [r["seq"] for r in records] == [2, 4]


def test_a_witness_record_edited_on_disk_is_reported(log, tmp_path):
    path, _, _ = log
    node = load_node(write_trial_nodes(load_config(None, ["data.languages=[aa]"]), tmp_path / "nodes")[0])
    entries = read_entries(path)
    witness(node, 1, AuditHead(entries[0]["hash"], 4, entries[4]["hash"], 0, [e["digest"] for e in entries]))
    record_file = node.state_dir / "witness.jsonl"
    record_file.write_text(record_file.read_text().replace('"seq": 4', '"seq": 3'))
    records, problems = load_witnesses([tmp_path / "nodes"], entries[0]["hash"])
    assert records == [] and "does not verify" in problems[0]


def test_a_second_writer_is_refused(log):
    path, key, _ = log
    first = AuditLog(path, key)
    with pytest.raises(FederationError, match="another coordinator is writing"):
        AuditLog(path, key)
    first.close()
    AuditLog(path, key).close()  # free again


def test_a_torn_write_is_cut_off_recorded_and_the_repaired_log_verifies(log):
    path, key, _ = log
    path.write_bytes(path.read_bytes() + b'{"seq": 5, "time": 1.0, "event": "rou')  # the crash mid-line
    audit = AuditLog(path, key)
    audit.close()
    entries = read_entries(path)
    assert [e["event"] for e in entries][-1] == "log_repaired" and entries[-1]["dropped_bytes"] == 37
    assert verify_log(path, key.public_key()).ok and len(entries) == 6


def test_an_altered_log_is_never_continued(log):
    path, key, _ = log
    rows = lines(path)
    rows[1] = rows[1].replace('"eng"', '"xyz"')
    write(path, rows)
    with pytest.raises(FederationError, match="line 2: content does not match"):
        AuditLog(path, key)


@pytest.fixture
def checkpoint(tmp_path):
    key = new_key()
    save_private(key, tmp_path / "coordinator.key")
    cfg = load_config(None, [f"server_key={tmp_path / 'coordinator.key'}"])
    state = RunState(global_arrays=OrderedDict(w=np.arange(3, dtype=np.float32)), completed=2,
                     rng_state={"x": 1}, best_arrays=OrderedDict(w=np.ones(3, dtype=np.float32)), best_round=1)
    save_checkpoint(tmp_path / "run", cfg, state, key)
    return tmp_path / "run", cfg


def test_an_honest_checkpoint_loads(checkpoint):
    run, cfg = checkpoint
    state = load_checkpoint(run, cfg)
    assert state.completed == 2 and list(state.global_arrays["w"]) == [0, 1, 2] and state.best_round == 1


@pytest.mark.parametrize("tamper,why", [
    (lambda meta, folder: meta.update(completed=5), "signature does not verify"),
    (lambda meta, folder: meta.update(rng_state={"x": 2}), "signature does not verify"),
    (lambda meta, folder: meta.pop("signature"), "not signed"),
    (lambda meta, folder: (folder / meta["files"]["global"]["name"]).write_bytes(
        (folder / meta["files"]["best"]["name"]).read_bytes()),
     "global file round-0002.global.safetensors is missing or was altered"),
    (lambda meta, folder: meta["files"]["global"].update(name="../../etc/passwd"), "signature does not verify"),
])
def test_an_edited_or_swapped_checkpoint_is_refused_before_any_engine_starts(checkpoint, tamper, why):
    run, cfg = checkpoint
    path = run / "checkpoint" / "state.json"
    meta = json.loads(path.read_text())
    tamper(meta, run / "checkpoint")
    path.write_text(json.dumps(meta))
    with pytest.raises(FederationError, match=f"checkpoint refused: .*{why}"):
        load_checkpoint(run, cfg)


def test_a_path_outside_the_checkpoint_is_refused_even_when_signed(checkpoint):
    """The coordinator's own key cannot make it read another file: names are checked too."""
    from securefpt.coordinator.checkpoint import _verified
    from securefpt.protocol.attestation import b64, canonical, load_private

    run, cfg = checkpoint
    meta = json.loads((run / "checkpoint" / "state.json").read_text())
    meta.pop("signature")
    meta["files"]["global"]["name"] = "../config.yaml"
    meta["signature"] = b64(load_private(cfg.server_key).sign(canonical(meta)))
    public = load_private(cfg.server_key).public_key()
    assert "not a checkpoint file name" in _verified(run / "checkpoint", meta, public)


def test_cli_verify_exit_codes_pinned_key_and_witnesses(log, tmp_path):
    path, key, head = log
    cmd = [sys.executable, "-m", "securefpt.cli", "audit", "verify", str(path),
           "--public-key", str(tmp_path / "server.pub"), "--head", head]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    rows = lines(path)
    rows[4] = rows[4].replace('"round"', '"rounds"', 1)
    write(path, rows)
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 1 and "line 5" in res.stderr
    res = subprocess.run(cmd[:6] + ["--witness", str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert res.returncode != 0


def test_verify_without_a_key_the_institution_holds_refuses_instead_of_trusting_the_run_directory(log, tmp_path):
    """A coordinator re-signs the log with a new key and writes a policy pinning that key into the run
    directory's config.yaml: `audit verify LOG` with no key of the verifier's own must not pass."""
    path, _, _ = log
    forged = new_key()
    save_public(forged, tmp_path / "forged.pub")
    resign(path, forged)
    (tmp_path / "policy.yaml").write_text("version: 1\n"
                                          "server: {region: eu, artifact_regions: [eu], audit_key: forged.pub}\n"
                                          "regions: {eu: {authority_key: forged.pub, export_to: [eu]}}\n")
    (tmp_path / "config.yaml").write_text(f"name: x\npolicy: {tmp_path / 'policy.yaml'}\n")
    res = subprocess.run([sys.executable, "-m", "securefpt.cli", "audit", "verify", str(path)],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "name a key you hold" in res.stderr and "intact" not in res.stdout
    genuine = tmp_path / "server.pub"  # the key the institution holds still catches the forgery
    res = subprocess.run([sys.executable, "-m", "securefpt.cli", "audit", "verify", str(path), "--public-key",
                          str(genuine)], capture_output=True, text=True)
    assert res.returncode == 1 and "TAMPERED" in res.stderr


def test_a_log_forked_per_node_at_genesis_fails_with_every_witness(log, tmp_path):
    """The coordinator shows node aa one log and node bb another (each internally valid and signed,
    each extending nothing the node had seen), in the same run. Verifying either log with both nodes'
    witness folders must fail: one run, two logs."""
    path, key, _ = log
    other = tmp_path / "fork" / "audit.jsonl"
    other.parent.mkdir()
    audit = AuditLog(other, key)
    for i in range(5):
        audit.append("round", round=i + 1, participants=["eng"], epsilon={"eng": 9.0})  # a different history
    audit.close()
    nodes = write_trial_nodes(load_config(None, ["data.languages=[aa, bb]"]), tmp_path / "nodes")
    for node_file, log_path in zip(nodes, (path, other)):
        entries = read_entries(log_path)
        witness(load_node(node_file), 7, AuditHead(entries[0]["hash"], 4, entries[4]["hash"], 0,
                                                   [e["digest"] for e in entries]))
    for log_path in (path, other):
        entries = read_entries(log_path)
        records, problems = load_witnesses([tmp_path / "nodes"], entries[0]["hash"])
        assert len(records) == 1 and check_witnesses(entries, records) is None  # each fork alone looks fine
        assert problems and "witnessed another log" in problems[0] and "run 7" in problems[0]
