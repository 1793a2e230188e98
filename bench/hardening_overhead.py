"""An honest federated run before and after the node-side hardening: wall time and accuracy.

The same experiment (packaged MiniLM, the demo data's five languages, SecAgg+, no DP so
that training is deterministic and the accuracies can be compared) runs once with this
checkout and once with an earlier revision of securefpt, checked out into a temporary
git worktree and imported first on PYTHONPATH, `--repeats` times each, alternating (a
single pair is too noisy on 2 cores: the same command varied by 20%); each run is a
fresh process and its `securefpt run` wall time is measured from outside. The medians
are compared; the accuracies are the last run's (without DP they do not vary).

    python bench/hardening_overhead.py [--before 49c62e0] [--repeats 3] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ["model.name=builtin:minilm", "model.max_length=64", "data.source=demo", "fl.rounds=3",
              "secagg.enabled=true", "dp.enabled=false", "seed=0"]


def run(code: Path, out: Path, overrides: list[str], home: Path) -> tuple[float, dict]:
    env = {**os.environ, "PYTHONPATH": str(code), "SECUREFPT_HOME": str(home)}
    cmd = [sys.executable, "-m", "securefpt.cli", "run", str(code / "securefpt" / "configs" / "demo.yaml"), "--out",
           str(out), "--quiet", *[f"--set={o}" for o in overrides]]
    if (code / "clients").is_dir() and not (code / "securefpt" / "node").is_dir():  # the old layout: no policy
        cmd += ["--set=policy=null", "--set=clients=null"]
    start = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=code)
    seconds = time.perf_counter() - start
    if res.returncode != 0:
        raise SystemExit(f"{code}: {res.stderr[-2000:]}")
    return seconds, json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", default="49c62e0", help="the revision before the hardening")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    overrides = EXPERIMENT + args.overrides
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tmp / "before"), args.before],
                       check=True, capture_output=True)
        times: dict[str, list] = {"before": [], "after": []}
        try:
            for k in range(args.repeats):
                for name, code in (("before", tmp / "before"), ("after", ROOT)):
                    seconds, summary = run(code, tmp / f"out-{name}-{k}", overrides, tmp / "home")
                    times[name].append(seconds)
                    if name == "before":
                        before = summary
                    else:
                        after = summary
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "before")],
                           capture_output=True)
    print(f"experiment: {' '.join(overrides)}")
    print("| | median wall s | " + " | ".join(before["final"]["accuracy"]) + " |")
    print("|---|---|" + "---|" * len(before["final"]["accuracy"]))
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    for name, label, summary in (("before", f"before ({args.before})", before), ("after", "after", after)):
        print(f"| {label} | {median[name]:.1f} (runs: {', '.join(f'{t:.1f}' for t in times[name])}) | "
              + " | ".join(f"{v:.3f}" for v in summary["final"]["accuracy"].values()) + " |")
    print(f"median time after / before: {median['after'] / median['before']:.3f}x")


if __name__ == "__main__":
    main()
