"""A node witnesses the coordinator's audit log: every head it is shown must extend the last one.

With each round's evaluation (and once at the end of a run) the coordinator sends the
log's current head and the digests of the entries since the node's last witnessed head.
The node recomputes the hash chain from its own last head (or from the genesis for a
log it has not seen): a head that does not extend it (a rewritten, forked or truncated
log) is refused, and the node stops answering that coordinator. Each witnessed head
is kept, signed with the node's attested key, in its state folder (`witness.jsonl`),
where `securefpt audit verify LOG --witness DIR` reads it.
"""

from __future__ import annotations

import json
import time
from typing import Optional

from securefpt.node.config import Node
from securefpt.protocol.attestation import b64
from securefpt.protocol.audit import GENESIS, WITNESS_FILE, link, witness_payload
from securefpt.protocol.messages import AuditHead, WitnessAck
from securefpt.protocol.refusals import NodeRefusal


def last_witnessed(node: Node, log_id: str) -> Optional[dict]:
    path = node.state_dir / WITNESS_FILE
    if not path.is_file():
        return None
    records = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    mine = [r for r in records if r["log_id"] == log_id]
    return max(mine, key=lambda r: r["seq"]) if mine else None


def witness(node: Node, run_id: int, shown: AuditHead) -> WitnessAck:
    """Check the head `shown` (and the digests that lead to it) and keep a signed record of it."""
    log_id, seq, head, start, digests = shown.log_id, shown.seq, shown.head, shown.from_seq, shown.digests
    last = last_witnessed(node, log_id)
    if start == 0:
        current = GENESIS
    elif last is not None and start == last["seq"] + 1:
        current = last["head"]
    else:
        raise NodeRefusal("audit-fork", f"digests from entry {start}, last witnessed {last and last['seq']}")
    for offset, digest in enumerate(digests):
        current = link(current, digest)
        at = start + offset
        if at == 0 and current != log_id:
            raise NodeRefusal("audit-fork", "the first entry is not the log's")
        if last is not None and at == last["seq"] and current != last["head"]:
            raise NodeRefusal("audit-fork", f"entry {at} differs from the one witnessed")
    if start + len(digests) - 1 != seq or current != head:
        raise NodeRefusal("audit-fork", f"head {head[:12]} at {seq} does not extend the witnessed chain")
    if last is not None and seq < last["seq"]:
        raise NodeRefusal("audit-fork", f"head at {seq} is behind the witnessed {last['seq']} (truncated)")
    if last is None or seq > last["seq"]:
        record = {"log_id": log_id, "seq": seq, "head": head, "run_id": int(run_id), "time": time.time(),
                  "client_id": node.client_id, "attestation": node.attestation.to_dict()}
        record["signature"] = b64(node.key.sign(witness_payload(record)))
        node.state_dir.mkdir(parents=True, exist_ok=True)
        with (node.state_dir / WITNESS_FILE).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
    return WitnessAck(seq)
