"""The signed, hash-chained audit log: every kind of tampering is named."""

import json
import subprocess
import sys

import pytest

from securefpt.protocol.attestation import new_key, save_public
from securefpt.protocol.audit import AuditLog, verify_log


@pytest.fixture
def log(tmp_path):
    key = new_key()
    save_public(key, tmp_path / "server.pub")
    audit = AuditLog(tmp_path / "audit.jsonl", key)
    for i in range(5):
        audit.append("round", round=i + 1, participants=["eng", "fra"], epsilon={"eng": 0.5 * i})
    return tmp_path / "audit.jsonl", key, audit.head


def lines(path):
    return path.read_text().splitlines()


def write(path, rows):
    path.write_text("\n".join(rows) + "\n")


def test_an_intact_log_verifies_and_continues_its_chain(log, tmp_path):
    path, key, head = log
    verdict = verify_log(path, key.public_key(), head)
    assert verdict.ok and verdict.entries == 5 and verdict.head == head
    AuditLog(path, key).append("run_end")  # a restarted server continues the same chain
    assert verify_log(path, key.public_key()).entries == 6


def test_one_changed_byte_is_detected(log):
    path, key, _ = log
    rows = lines(path)
    rows[2] = rows[2].replace('"fra"', '"frb"')
    write(path, rows)
    verdict = verify_log(path, key.public_key())
    assert not verdict.ok and verdict.bad_line == 3 and "altered" in verdict.reason


def test_a_deleted_entry_is_detected(log):
    path, key, _ = log
    rows = lines(path)
    del rows[1]
    write(path, rows)
    verdict = verify_log(path, key.public_key())
    assert not verdict.ok and verdict.bad_line == 2


def test_two_reordered_entries_are_detected(log):
    path, key, _ = log
    rows = lines(path)
    rows[1], rows[2] = rows[2], rows[1]
    write(path, rows)
    verdict = verify_log(path, key.public_key())
    assert not verdict.ok and verdict.bad_line == 2


def test_an_inserted_forged_entry_is_detected(log, tmp_path):
    path, key, _ = log
    rows = lines(path)
    # a well-formed, chained entry signed with another key
    forger = AuditLog(tmp_path / "other.jsonl", new_key())
    forger.head, forger.seq = json.loads(rows[1])["hash"], 2
    forger.append("round", round=99, participants=["eng"])
    forged = lines(tmp_path / "other.jsonl")[0]
    write(path, rows[:2] + [forged] + rows[2:])
    verdict = verify_log(path, key.public_key())
    assert not verdict.ok and verdict.bad_line == 3 and "forged" in verdict.reason


def test_a_truncated_tail_is_detected_against_a_known_head(log):
    path, key, head = log
    write(path, lines(path)[:3])
    assert verify_log(path, key.public_key()).ok  # on its own a prefix is a valid log...
    verdict = verify_log(path, key.public_key(), expected_head=head)
    assert not verdict.ok and "truncated" in verdict.reason  # ...but not against the known head


def test_cli_verify_exit_codes(log, tmp_path):
    path, _, head = log
    cmd = [sys.executable, "-m", "securefpt.cli", "audit", "verify", str(path),
           "--public-key", str(tmp_path / "server.pub"), "--head", head]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    rows = lines(path)
    rows[4] = rows[4].replace('"round"', '"rounds"', 1)
    write(path, rows)
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 1 and "line 5" in res.stderr
