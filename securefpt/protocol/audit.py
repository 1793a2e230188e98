"""The tamper-evident audit log's format, and how anyone checks it: the coordinator's key, the nodes' witness.

An entry is one JSON line: `seq`, `time`, `event`, its fields, `prev` (the previous
entry's hash, 64 zeros for the first), `digest` (SHA-256 of the canonical JSON of the
entry without `prev`, `digest`, `hash` and `signature`), `hash` = SHA-256(prev + digest),
and `signature` (the coordinator's Ed25519 signature of the hash).

Two checks, because the coordinator itself is not trusted:
- `verify_log`: every entry's digest, link and signature, with the coordinator's key
  pinned in the federation's policy (a log re-signed with another key fails);
- `check_witnesses`: the heads the nodes witnessed during the run (node/witness.py). The
  chain of hashes needs only the digests, so a node verifies that each new head extends
  the last one it saw without reading any entry; a log later rewritten, forked or
  truncated, even re-signed with the pinned key, misses a witnessed head.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from securefpt.errors import ConfigError
from securefpt.protocol.attestation import Attestation, attested_key, canonical, unb64, verify

GENESIS = "0" * 64
CHAIN_KEYS = ("prev", "digest", "hash", "signature")


def entry_digest(entry: dict) -> str:
    body = {k: v for k, v in entry.items() if k not in CHAIN_KEYS}
    return hashlib.sha256(canonical(body)).hexdigest()


def link(prev: str, digest: str) -> str:
    return hashlib.sha256((prev + digest).encode("ascii")).hexdigest()


def extend(head: str, digests: Iterable[str]) -> str:
    """The head reached from `head` by appending entries with these digests."""
    for digest in digests:
        head = link(head, digest)
    return head


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class Verdict:
    ok: bool
    entries: int
    head: str
    bad_line: Optional[int] = None
    reason: str = "intact"


def check_entry(entry: dict, count: int, prev: str, public: Ed25519PublicKey) -> Optional[str]:
    """Why this entry (the `count`-th, after `prev`) does not belong to the chain, or None."""
    for key in ("seq", "event", *CHAIN_KEYS):
        if key not in entry:
            return f"missing '{key}'"
    if entry["seq"] != count:
        return f"sequence {entry['seq']} where {count} was due (entry removed or reordered)"
    if entry["prev"] != prev:
        return "does not link to the previous entry (removed, reordered or inserted)"
    if entry_digest(entry) != entry["digest"] or link(prev, entry["digest"]) != entry["hash"]:
        return "content does not match its hash (entry altered)"
    try:
        signature = unb64(entry["signature"])
    except ValueError:
        return "signature is not base64"
    if not verify(public, signature, entry["hash"].encode("ascii")):
        if count == 0:  # nothing verifies: most likely not the key that signed this log
            return "the first entry's signature does not verify with this key: the wrong key, or a log re-signed"
        return "signature does not verify with the coordinator's key (forged or re-signed)"
    return None


def verify_log(path: Path, public: Ed25519PublicKey, expected_head: Optional[str] = None) -> Verdict:
    """Check every entry's digest, link, sequence number and signature."""
    prev, count = GENESIS, 0
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    hashes = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            return Verdict(False, count, prev, number, "not a JSON object")
        if not isinstance(entry, dict):
            return Verdict(False, count, prev, number, "not a JSON object")
        why = check_entry(entry, count, prev, public)
        if why is not None:
            return Verdict(False, count, prev, number, why)
        prev, count = entry["hash"], count + 1
        hashes.add(prev)
    if expected_head is not None and expected_head not in hashes:
        return Verdict(False, count, prev, count + 1, f"the known head {expected_head[:12]}... is missing: "
                                                      "the log was truncated or rewritten")
    return Verdict(True, count, prev)


def read_entries(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]


def check_witnesses(entries: list[dict], records: list[dict]) -> Optional[str]:
    """Why the log contradicts a head a node witnessed (None: every witnessed head is in it).

    `records` are witness records of this log (same log id): {client_id, seq, head}."""
    by_seq = {int(e["seq"]): e.get("hash") for e in entries}
    for record in records:
        seq, head = int(record["seq"]), str(record["head"])
        if seq not in by_seq:
            return (f"node '{record['client_id']}' witnessed entry {seq}, which the log does not have "
                    "(truncated)")
        if by_seq[seq] != head:
            return f"entry {seq} is not the one node '{record['client_id']}' witnessed (rewritten or forked)"
    return None


WITNESS_FILE = "witness.jsonl"
WITNESS_PURPOSE = "securefpt audit witness v1"


def witness_payload(record: dict) -> bytes:
    """What a node signs for a head it witnessed."""
    return canonical({"purpose": WITNESS_PURPOSE, **{k: v for k, v in record.items() if k != "signature"}})


def load_witnesses(folders: Iterable[Path], log_id: str) -> tuple[list[dict], list[str]]:
    """The witness records of this log under each folder (a node's state folder or a folder of
    them, e.g. a simulation run's nodes/), and the problems found: a record whose signature does
    not verify with the key its own attestation names is reported, not used, and so is a record
    showing that, in a run this log's witnesses took part in, some node was shown a different log
    (a coordinator that forks its log at genesis, one fork per node, would otherwise pass with the
    witnesses of the fork it presents)."""
    every: list[dict] = []
    problems: list[str] = []
    for folder in folders:
        files = [Path(folder)] if Path(folder).is_file() else sorted(Path(folder).rglob(WITNESS_FILE))
        if not files:
            problems.append(f"{folder}: no {WITNESS_FILE} (not a node's state folder)")
        for path in files:
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                try:
                    record = json.loads(line)
                    public = attested_key(Attestation(**record["attestation"]))
                    signed = verify(public, unb64(record["signature"]), witness_payload(record))
                except (ValueError, KeyError, TypeError, ConfigError):
                    signed = False
                if not signed:
                    problems.append(f"{path}:{number}: a witness record whose signature does not verify")
                else:
                    every.append(record)
    records = [r for r in every if r["log_id"] == log_id]
    runs = {int(r["run_id"]) for r in records}
    for other in every:  # a log forked per node: in the same run, another node was shown another log
        if other["log_id"] != log_id and int(other["run_id"]) in runs:
            problems.append(f"node '{other['client_id']}' witnessed another log ({str(other['log_id'])[:12]}) in "
                            f"run {other['run_id']}, which this log's witnesses saw: the log was forked")
            break
    return records, problems
