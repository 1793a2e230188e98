"""Deployment engine against the simulation engine for the same work; bytes per round per node.

    python bench/deployment.py [--set key=value ...]

Runs server/deploy-tiny.yaml (tiny model, eng/fra/hau, SecAgg+, 2 rounds) under the
deployment policy twice: on a loopback federation of separate processes (a SuperLink
and three SuperNodes, TLS, node authentication, identity proofs; securefpt/loopback.py)
and on the simulation engine. Prints wall times and their ratio, per-round times, and
the serialized Flower message bytes per round per node (as the ServerApp's Grid sees
them: protobuf, before HTTP/TLS framing) against the trainable parameters' float32 size,
and where a round's seconds go: its exchanges with the nodes, each timed from push to last
reply, on both engines (the difference is what an exchange costs a deployed node beyond the
work itself: the SuperNode's idle pull interval, a fresh ClientApp process per message).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from securefpt.engines.loopback import EXPERIMENT, Loopback
from securefpt.engines.simulation import run_federated_simulation
from securefpt.experiment.loading import load_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fed = Loopback(Path(tmp))
        try:
            fed.start_superlink()
            ids = fed.start_institutions()
            fed.wait_online(set(ids.values()))
            start = time.perf_counter()
            fed.submit(Path(tmp) / "deployed", " ".join(args.overrides))
            deployed_s = time.perf_counter() - start
        finally:
            fed.stop()
        deployed = json.loads((Path(tmp) / "deployed" / "summary.json").read_text())
        cfg = load_config(EXPERIMENT, fed.overrides.split() + args.overrides)
        start = time.perf_counter()
        simulated = run_federated_simulation(cfg, Path(tmp) / "simulated", show_progress=False)
        simulated_s = time.perf_counter() - start

    nodes = len(ids)
    param_bytes = deployed["trainable_params"] * 4
    print(f"3-node deployment (flwr run to summary): {deployed_s:.1f} s; simulation engine: {simulated_s:.1f} s; "
          f"ratio {deployed_s / simulated_s:.2f}x")
    dep_round = statistics.median(r["seconds"] for r in deployed["rounds"])
    sim_round = statistics.median(r["seconds"] for r in simulated["rounds"])
    print(f"median round: deployment {dep_round:.1f} s, simulation {sim_round:.1f} s, "
          f"ratio {dep_round / sim_round:.2f}x")
    for name, summary in (("deployment", deployed), ("simulation", simulated)):
        exchanges = [r["exchanges"] for r in summary["rounds"]]
        each = [t for r in summary["rounds"] for t in r["exchange_seconds"]]
        print(f"{name}: exchanges per round {exchanges}; an exchange takes median {statistics.median(each):.2f} s "
              f"(min {min(each):.2f}, max {max(each):.2f}); exchanges are "
              f"{sum(each) / sum(r['seconds'] for r in summary['rounds']):.0%} of the rounds' time")
    print(f"trainable parameters: {deployed['trainable_params']:,} ({param_bytes:,} bytes as float32)")
    print("| round | engine | bytes up / node | bytes down / node | up / param bytes | down / param bytes |")
    print("|---|---|---|---|---|---|")
    for name, summary in (("deployment", deployed), ("simulation", simulated)):
        for r in summary["rounds"]:
            up, down = r["bytes_up"] / nodes, r["bytes_down"] / nodes
            print(f"| {r['round']} | {name} | {up:,.0f} | {down:,.0f} | {up / param_bytes:.2f} "
                  f"| {down / param_bytes:.2f} |")


if __name__ == "__main__":
    main()
