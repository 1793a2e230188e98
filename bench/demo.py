"""`securefpt demo` as a new user runs it: wall time, peak memory of the whole process tree, accuracy.

Runs the demo (the multilingual default) and, as the baseline measured in the same run, the
same demo on the English-only MiniLM; prints each one's wall time, peak memory (the sum of
the proportional set sizes of the CLI and every process it started: Ray's workers share the
memory-mapped frozen weights, and PSS counts a shared page once across them) and final
per-language accuracy, then the ratios.

    python bench/demo.py [--skip-baseline] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent / "securefpt"


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(root: int) -> list[int]:
    """`root` and its descendants, from /proc (Ray's workers are grandchildren of the CLI)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def run_demo(out: Path, overrides: list[str]) -> dict:
    args = [str(BIN), "demo", "--out", str(out)] + [a for o in overrides for a in ("--set", o)]
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], sum(_pss_kib(p) for p in _tree(proc.pid)))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"securefpt demo failed ({proc.returncode}): {stderr.strip()[-500:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"seconds": seconds, "peak_pss_mib": peak[0] / 1024, "accuracy": summary["final"]["accuracy"],
            "model": summary["model"], "excluded": [c for c, v in summary["clients"].items() if not v["included"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-baseline", action="store_true", help="run the multilingual demo only")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores")
    runs = [("multilingual-e5-small (default)", args.overrides)]
    if not args.skip_baseline:
        runs.append(("minilm (baseline)", args.overrides + ["model.name=builtin:minilm"]))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(runs):
            r = results[name] = run_demo(Path(tmp) / f"run{i}", overrides)
            acc = "  ".join(f"{k}={v:.3f}" for k, v in r["accuracy"].items())
            print(f"{name}: {r['seconds']:.0f} s, peak {r['peak_pss_mib']:.0f} MiB (PSS of the process tree); "
                  f"{acc}; excluded: {', '.join(r['excluded']) or 'none'}", flush=True)
    if len(results) == 2:
        (a, ra), (b, rb) = results.items()
        print(f"ratio {a} / {b}: time {ra['seconds'] / rb['seconds']:.2f}x, "
              f"memory {ra['peak_pss_mib'] / rb['peak_pss_mib']:.2f}x, "
              f"avg accuracy {ra['accuracy']['avg'] - rb['accuracy']['avg']:+.3f}")


if __name__ == "__main__":
    main()
