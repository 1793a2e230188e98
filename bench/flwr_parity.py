"""`flwr run .` against `securefpt demo`: the same experiment, the same output (issue: every document is true).

Runs `securefpt demo` and then `flwr run . --stream` from this checkout with the environment
`.venv/bin/activate` sets (scripts/setup.sh), both under one fresh $SECUREFPT_HOME (one demo
federation), and compares what each printed, line by line, with every number replaced by `#`
(DP noise comes from the OS, so the figures differ from run to run; the lines must not) and
run directories named alike. Flower's own lines before the app starts (the local SuperLink,
the federation's size, the app's installation) are listed apart: the app cannot change them.
Prints the lines one printed where the other did not (a line-by-line diff, in order), each
run's wall time, and a verdict.

    python bench/flwr_parity.py
"""

from __future__ import annotations

import difflib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FLOWER_PREAMBLE = ("Starting local SuperLink", "Using SuperLink", "⚠️", "Successfully started run",
                   "Successfully installed", "Starting logstream", "Starting Flower Simulation",
                   "Since flwr 1.32", "Federation `@none", "To change federation size", "flwr federation simulation")


def shape(line: str, out: Path) -> str:
    line = re.sub(r"\x1b\[[0-9;]*m", "", line).replace(str(out.resolve()), "RUN").replace(str(out), "RUN")
    line = re.sub(r"/\S*/demo-federation", "FEDERATION", line)
    return " ".join(re.sub(r"\d+(\.\d+)?", "#", line).split())  # numbers and column widths vary


def run(command: list[str], env: dict, out: Path) -> tuple[float, list[str], list[str]]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=1800)  # one stream, in the order printed
    seconds = time.perf_counter() - start
    lines = [x for x in done.stdout.splitlines() if x.strip() and "━" not in x]
    preamble = [x for x in lines if any(p in x for p in FLOWER_PREAMBLE)]
    return seconds, [shape(x, out) for x in lines if x not in preamble], preamble


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="flwr-parity-"))
    env = {**os.environ, "SECUREFPT_HOME": str(work / "home"), "COLUMNS": "120",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "FLWR_HOME": str(ROOT / ".flwr"),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "SECUREFPT_FLWR_SIMULATION": "1",
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    demo_out, flwr_out = work / "demo", work / "flwr"
    demo_s, demo, _ = run([str(BIN / "securefpt"), "demo", "--out", str(demo_out)], env, demo_out)
    demo = [x for x in demo if not x.startswith("made the demo federation")]  # the first demo's one-off line
    before = set(subprocess.run(["pgrep", "-f", "flower-superlink"], capture_output=True, text=True).stdout.split())
    try:
        flwr_s, flwr, preamble = run([str(BIN / "flwr"), "run", ".", "--stream", "--run-config",
                                      f'out-dir="{flwr_out}"'], env, flwr_out)
    finally:  # Flower leaves the local SuperLink it started running: stop that one
        found = subprocess.run(["pgrep", "-f", "flower-superlink"], capture_output=True, text=True)
        for pid in set(found.stdout.split()) - before:
            os.kill(int(pid), signal.SIGTERM)
    diff = [x for x in difflib.ndiff(demo, flwr) if x[:1] in "-+"]
    only_demo = [x[2:] for x in diff if x.startswith("-")]
    only_flwr = [x[2:] for x in diff if x.startswith("+")]
    print(f"machine: {os.cpu_count()} cores")
    print(f"securefpt demo: {demo_s:.0f} s, {len(demo)} lines; flwr run .: {flwr_s:.0f} s, {len(flwr)} lines "
          f"after Flower's own {len(preamble)} lines before the app starts:")
    for line in preamble:
        print(f"    {line}")
    print("only in securefpt demo:" + ("" if only_demo else " none"))
    for line in only_demo:
        print(f"  - {line}")
    print("only in flwr run .:" + ("" if only_flwr else " none"))
    for line in only_flwr:
        print(f"  + {line}")
    print("verdict: " + ("the same lines" if not only_demo and not only_flwr else "different"))


if __name__ == "__main__":
    main()
