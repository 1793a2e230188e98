"""The coordinator's audit log writer: one writer, a verified chain before every append, crash-safe.

- One writer: an exclusive lock on `<log>.lock` for as long as the log is open; a second
  coordinator on the same run directory is refused.
- Resume verifies the whole chain with the coordinator's key before it appends: a log
  that was altered is refused, never continued.
- A write torn by a crash (a last line without its newline that is not a whole, valid
  entry) is cut back to the last complete entry, and a `log_repaired` entry records it.
- Every entry is flushed to disk before `append` returns.
The format and the checks anyone can run are in protocol/audit.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from securefpt.errors import FederationError
from securefpt.protocol.attestation import b64
from securefpt.protocol.audit import GENESIS, check_entry, entry_digest, link


class AuditLog:
    """Appends signed, chained entries to a JSONL file (continuing an existing, verified chain)."""

    def __init__(self, path: Path, key: Ed25519PrivateKey) -> None:
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path.with_name(self.path.name + ".lock"), "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise FederationError(f"{self.path}: another coordinator is writing this audit log") from None
        self.head, self.digests = GENESIS, []  # the digests let nodes witness heads (node/witness.py)
        repaired = self._load() if self.path.exists() else 0
        if repaired:
            self.append("log_repaired", dropped_bytes=repaired, reason="a write torn by a crash was cut off")

    @property
    def seq(self) -> int:
        return len(self.digests)

    @property
    def log_id(self) -> Optional[str]:
        """The first entry's hash: what nodes key their witnessed heads by."""
        return link(GENESIS, self.digests[0]) if self.digests else None

    def _load(self) -> int:
        """Verify the chain on disk; cut a torn last line. The number of bytes cut off."""
        raw = self.path.read_bytes()
        body, _, tail = raw.rpartition(b"\n")
        lines = body.split(b"\n") if body else []
        if tail:  # the last line lacks its newline: a torn write, unless it is a whole valid entry
            lines.append(tail)
        public, kept = self.key.public_key(), []
        for number, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
                why = check_entry(entry, self.seq, self.head, public) if isinstance(entry, dict) else "not an entry"
            except (json.JSONDecodeError, UnicodeDecodeError):
                why = "not a JSON object"
            if why is not None:
                if number == len(lines) and tail:
                    break  # torn: cut off below
                raise FederationError(f"{self.path}: line {number}: {why}; an altered audit log is not continued")
            self.head = entry["hash"]
            self.digests.append(entry["digest"])
            kept.append(line)
        if tail:  # rewrite whole: the complete entries, each with its newline
            content = b"".join(line + b"\n" for line in kept)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_bytes(content)
            os.replace(tmp, self.path)
            return len(raw) - len(content) + (1 if len(kept) == len(lines) else 0)
        return 0

    def append(self, event: str, **fields: Any) -> str:
        entry = json.loads(json.dumps({"seq": self.seq, "time": time.time(), "event": event, **fields},
                                      default=str))
        entry["prev"], entry["digest"] = self.head, entry_digest(entry)
        entry["hash"] = link(self.head, entry["digest"])
        entry["signature"] = b64(self.key.sign(entry["hash"].encode("ascii")))
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.head = entry["hash"]
        self.digests.append(entry["digest"])
        return entry["hash"]

    def close(self) -> None:
        """Release the writer's lock (the process ending releases it too)."""
        if not self._lock.closed:
            Path(self._lock.name).unlink(missing_ok=True)
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
