"""Cost per round of policy evaluation, audit signing/verification and witnessing for 1,000 nodes.

Builds a federation of N nodes over 5 regions (real Ed25519 attestations), then times
one round's work on the coordinator: deciding every node's eligibility (attestation
checks + rules + cohort minimums), appending the signed round entries to the audit log,
verifying the whole log, and building each node's audit head to witness (the digests
since the head it acknowledged). And one node's share of witnessing: checking that the
head extends its last one and signing its record (measured over 20 rounds of a log that
grows by 5 entries a round; every node does this on its own machine, in parallel).
Reported against the measured training time of one federated round (docs/benchmarks.md:
240 examples at 22.46 examples/s = 10.7 s).

    python bench/policy_cost.py [--clients 1000] [--round-seconds 10.7]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from flwr.app import ConfigRecord

from securefpt.coordinator.audit_log import AuditLog
from securefpt.coordinator.eligibility import decide_eligibility
from securefpt.engines.trial_nodes import write_trial_nodes
from securefpt.experiment.loading import load_config
from securefpt.node.config import load_node
from securefpt.node.witness import witness
from securefpt.protocol.attestation import issue, new_key, public_raw, save_public
from securefpt.protocol.audit import verify_log
from securefpt.protocol.policy import ClientManifest, DPRequirement, Policy, RegionRule, ServerBlock

REGIONS = ["eu-west", "uk", "ke", "ng-north", "ng-south"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--round-seconds", type=float, default=10.7)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    authorities = {r: new_key() for r in REGIONS}
    for r, k in authorities.items():
        save_public(k, tmp / f"{r}.pub")
    coordinator = new_key()
    save_public(coordinator, tmp / "coordinator.pub")
    server = ServerBlock(region="eu-west", artifact_regions=["eu-west"], audit_key=tmp / "coordinator.pub")
    policy = Policy(server=server, regions={
        r: RegionRule(authority_key=tmp / f"{r}.pub", export_to=["eu-west", r] if r != "ng-south" else [r],
                      dp=DPRequirement(required=r == "ng-north", max_epsilon=8 if r == "ng-north" else None),
                      min_cohort=3) for r in REGIONS})
    expires = datetime.now(timezone.utc) + timedelta(days=30)
    languages = [f"l{i}" for i in range(args.clients)]
    manifests = {}
    for i, lang in enumerate(languages):
        region = REGIONS[i % len(REGIONS)]
        cid = f"client-{i}"
        att = issue(authorities[region], cid, region, lang, public_raw(new_key()), expires)
        manifests[cid] = ClientManifest(client_id=cid, region=region, language=lang, attestation=att)
    cfg = load_config(None, [f"data.languages=[{', '.join(languages)}]", "dp.enabled=true", "dp.target_epsilon=8"])

    start = time.perf_counter()
    decisions = decide_eligibility(policy, cfg, manifests)
    decide_s = time.perf_counter() - start

    key = coordinator
    audit = AuditLog(tmp / "audit.jsonl", key)
    start = time.perf_counter()
    audit.append("eligibility", clients={c: {"included": d.included, "reason": d.reason} for c, d in decisions.items()})
    audit.append("round", round=1, participants=[c for c, d in decisions.items() if d.included],
                 epsilon={c: 1.234 for c in decisions})
    sign_s = time.perf_counter() - start
    start = time.perf_counter()
    assert verify_log(tmp / "audit.jsonl", key.public_key()).ok
    verify_s = time.perf_counter() - start

    # witnessing: the coordinator's head record for each node, then one node's check and signature
    for _ in range(3):
        audit.append("round", round=2, participants=[])
    start = time.perf_counter()
    heads = [ConfigRecord({"log-id": audit.log_id, "seq": audit.seq - 1, "head": audit.head,
                           "from-seq": audit.seq - 5, "digests": audit.digests[-5:]}) for _ in range(args.clients)]
    heads_s = time.perf_counter() - start
    node = load_node(write_trial_nodes(load_config(None, ["data.languages=[aa]"]), tmp / "nodes")[0])
    witness(node, 1, ConfigRecord({"log-id": audit.log_id, "seq": audit.seq - 1, "head": audit.head, "from-seq": 0,
                                   "digests": audit.digests}))
    node_s = []
    for _ in range(20):
        start_seq = audit.seq
        for _ in range(5):
            audit.append("round", round=3, participants=[])
        start = time.perf_counter()
        witness(node, 1, ConfigRecord({"log-id": audit.log_id, "seq": audit.seq - 1, "head": audit.head,
                                       "from-seq": start_seq, "digests": audit.digests[start_seq:]}))
        node_s.append(time.perf_counter() - start)
    node_s = sorted(node_s)[len(node_s) // 2]
    assert len(heads) == args.clients

    included = sum(d.included for d in decisions.values())
    total = decide_s + sign_s + verify_s + heads_s
    print(f"{args.clients} clients ({included} eligible)")
    print(f"eligibility decisions: {decide_s * 1000:8.1f} ms")
    print(f"audit append + sign:   {sign_s * 1000:8.1f} ms")
    print(f"audit verify:          {verify_s * 1000:8.1f} ms")
    print(f"witness heads, {args.clients} nodes: {heads_s * 1000:6.1f} ms")
    print(f"total per round:       {total * 1000:8.1f} ms = {total / args.round_seconds:.2%} "
          f"of a {args.round_seconds} s training round")
    print(f"one node's witnessing: {node_s * 1000:8.2f} ms a round (median of 20) = "
          f"{node_s / args.round_seconds:.3%} of the round; all {args.clients} nodes' CPU together: "
          f"{node_s * args.clients * 1000:.0f} ms")


if __name__ == "__main__":
    main()
