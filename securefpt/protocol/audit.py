"""The tamper-evident audit log: append-only JSONL, hash-chained, signed by the server.

Each entry holds `seq`, `time`, `event`, its fields, `prev` (the previous entry's hash,
64 zeros for the first), `hash` (SHA-256 of the canonical JSON of everything but `hash`
and `signature`) and `signature` (the server's Ed25519 signature of the hash). Anyone
with the server's public key can check that no entry was changed, removed, reordered
or inserted; a truncated tail shows up against a head hash known from elsewhere (the
run's summary, another institution's copy).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from securefpt.protocol.attestation import b64, canonical, unb64, verify

GENESIS = "0" * 64


def entry_hash(entry: dict) -> str:
    body = {k: v for k, v in entry.items() if k not in ("hash", "signature")}
    return hashlib.sha256(canonical(body)).hexdigest()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class AuditLog:
    """Appends signed, chained entries to a JSONL file (continuing an existing chain)."""

    def __init__(self, path: Path, key: Ed25519PrivateKey) -> None:
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.head, self.seq = GENESIS, 0
        if self.path.exists():
            lines = [x for x in self.path.read_text(encoding="utf-8").splitlines() if x.strip()]
            if lines:
                last = json.loads(lines[-1])
                self.head, self.seq = last["hash"], int(last["seq"]) + 1

    def append(self, event: str, **fields: Any) -> str:
        entry = json.loads(json.dumps({"seq": self.seq, "time": time.time(), "event": event, **fields,
                                       "prev": self.head}, default=str))
        entry["hash"] = entry_hash(entry)
        entry["signature"] = b64(self.key.sign(entry["hash"].encode("ascii")))
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n")
        self.head, self.seq = entry["hash"], self.seq + 1
        return entry["hash"]


@dataclass
class Verdict:
    ok: bool
    entries: int
    head: str
    bad_line: Optional[int] = None
    reason: str = "intact"


def verify_log(path: Path, public: Ed25519PublicKey, expected_head: Optional[str] = None) -> Verdict:
    """Check every entry's hash, signature, sequence number and link to its predecessor."""
    prev, count = GENESIS, 0
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            return Verdict(False, count, prev, number, "not a JSON object")
        for key in ("seq", "event", "prev", "hash", "signature"):
            if key not in entry:
                return Verdict(False, count, prev, number, f"missing '{key}'")
        if entry["seq"] != count:
            return Verdict(False, count, prev, number, f"sequence {entry['seq']} where {count} was due (entry removed or reordered)")
        if entry["prev"] != prev:
            return Verdict(False, count, prev, number, "does not link to the previous entry (removed, reordered or inserted)")
        if entry_hash(entry) != entry["hash"]:
            return Verdict(False, count, prev, number, "content does not match its hash (entry altered)")
        try:
            signature = unb64(entry["signature"])
        except ValueError:
            return Verdict(False, count, prev, number, "signature is not base64")
        if not verify(public, signature, entry["hash"].encode("ascii")):
            return Verdict(False, count, prev, number, "signature does not verify with this public key (forged)")
        prev, count = entry["hash"], count + 1
    if expected_head is not None and expected_head != prev:
        known = any(json.loads(x).get("hash") == expected_head for x in lines if x.strip())
        if not known:
            return Verdict(False, count, prev, count + 1,
                           f"the known head {expected_head[:12]}... is missing: the log was truncated")
    return Verdict(True, count, prev)


def read_entries(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]
