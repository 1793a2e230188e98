"""The resume fault matrix: stop a run at each phase of a round, with each signal, and resume it.

Each cell runs `securefpt run` (simulation engine) with SECUREFPT_FAULTS set to one drill
(securefpt/coordinator/interrupts.py: SIGINT is the operator's Ctrl-C, SIGKILL a crash with
nothing cleaned up), then the same command again without it, as the message says. A cell
is resumed when the second run ends with exit 0 (or is not needed: the interrupt came after
the results were written), every planned round once in summary.json, and an audit log that
verifies with every node's witness records. Also reported: how far the
final encoder is from an uninterrupted run of the same command (the largest difference of
one weight) beside how far two uninterrupted runs are from each other (run-to-run noise:
SecAgg+ rounds randomly), the final accuracy, the most times one node trained on one
encoder, and Ray processes a killed run left behind (counted after the resumed run; they
go on their own: the matrix ends by waiting for them).

    python bench/resume_matrix.py [--rounds 3] [--signals sigint sigkill] [--events ...] [--out DIR]

The experiment: the packaged demo data, the tiny in-code model, three languages, SecAgg+,
no DP. Prints a markdown table (docs/engines.md keeps the last one) and writes
resume-matrix.json in --out.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ["model.name=builtin:tiny", "model.max_length=32", "peft.num_virtual_tokens=4", "data.source=demo",
              "data.languages=[eng,fra,hau]", "data.max_train_per_client=24", "data.max_eval_per_client=20",
              "fl.local_epochs=1", "secagg.enabled=true", "dp.enabled=false", "seed=0"]


def events(rounds: int) -> list[str]:
    """Every drill point of a run, in the order a run meets them (round 2 stands for a middle round)."""
    r = min(2, rounds)
    return (["setup", f"round-{r}:train"]
            + [f"round-{r}:{stage}" for stage in ("setup", "share_keys", "collect_masked_vectors", "unmask")]
            + [f"round-{r}:aggregated", f"round-{r}:evaluate", f"round-{r}:checkpoint", f"round-{r}", "witness"])


def command(out: Path, rounds: int) -> list[str]:
    return [sys.executable, "-m", "securefpt.cli", "run", str(ROOT / "securefpt" / "configs" / "demo.yaml"),
            "--out", str(out), "--quiet", *[f"--set={o}" for o in EXPERIMENT + [f"fl.rounds={rounds}"]]]


def ray_processes() -> int:
    found = subprocess.run(["pgrep", "-f", "ray::|raylet|gcs_server"], capture_output=True, text=True)
    return len(found.stdout.split())


def encoder(out: Path) -> dict:
    from securefpt.learning.artifacts import load_arrays

    return load_arrays(out / "prompt_encoder.safetensors")


def trainings_per_encoder(out: Path) -> int:
    """The most times one node trained on one global encoder, over both runs (1; 2 where a secure
    round interrupted before its unmask stage is redone on the encoder the node held)."""
    most = 0
    for state in (out / "nodes").iterdir():
        runs = [json.loads(p.read_text()) for p in (state / "runs").glob("*.json")] if state.is_dir() else []
        trained = [r["offered"][str(k)] for r in runs for k in r.get("trained", []) if str(k) in r.get("offered", {})]
        most = max([most] + [trained.count(h) for h in trained])
    return most


def distance(a: dict, b: dict) -> float:
    return float(max(np.max(np.abs(a[k] - b[k])) for k in a))


def _verdict(text: str) -> dict:
    """`audit verify`'s verdict, short, with its entries and the last one the witnesses agree on."""
    words = " ".join(text.split())
    entries = words.split(" entries")[0].split()[-1] if " entries" in words else "?"
    witnessed = words.split("agree up to entry ")[-1].split()[0] if "agree up to entry " in words else "none"
    return {"verify_line": f"{words.split(':')[0]}, {entries} entries, witnessed to entry {witnessed}",
            "last_entry_witnessed": entries.isdigit() and witnessed == str(int(entries) - 1)}


def cell(event: str, signal_name: str, rounds: int, work: Path, env: dict, baseline: dict) -> dict:
    out = work / f"{event.replace(':', '-')}-{signal_name}"
    before = ray_processes()
    start = time.perf_counter()
    first = subprocess.run(command(out, rounds), capture_output=True, text=True,
                           env={**env, "SECUREFPT_FAULTS": f"coordinator@{event}:{signal_name}"})
    finished = (out / "summary.json").is_file()  # the interrupt came after the run's results were written
    second = None if finished else subprocess.run(command(out, rounds), capture_output=True, text=True, env=env)
    left = max(ray_processes() - before, 0)
    row = {"event": event, "signal": signal_name, "first_exit": first.returncode,
           "resume_exit": None if second is None else second.returncode,
           "left_processes": left, "seconds": round(time.perf_counter() - start, 1),
           "resume_message": "" if second is None else (second.stderr.strip().splitlines() or [""])[-1][:160]}
    summary_path = out / "summary.json"
    if (finished or second.returncode == 0) and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        verify = subprocess.run([sys.executable, "-m", "securefpt.cli", "audit", "verify", str(out / "audit.jsonl"),
                                 "--witness", str(out / "nodes")], capture_output=True, text=True, env=env)
        mine = encoder(out)
        row.update(rounds=[r["round"] for r in summary["rounds"]], log_verifies=verify.returncode == 0,
                   **_verdict(verify.stdout + verify.stderr),
                   accuracy=summary["final"]["accuracy"], baseline_accuracy=baseline["accuracy"],
                   distance=distance(mine, baseline["encoder"]),
                   trainings_per_encoder=trainings_per_encoder(out))
    row["resumed"] = bool(row.get("rounds") == list(range(1, rounds + 1)) and row.get("log_verifies"))
    lost = not row.get("last_entry_witnessed", True)
    row["outcome"] = ("finished without a resume" if finished else "resumed") if row["resumed"] else \
        f"NOT resumed: {row['resume_message']}"
    if row["resumed"] and finished and lost:
        row["outcome"] += "; the last entries are not witnessed"
    return row


def _num(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def table(rows: list[dict]) -> str:
    lines = ["| interrupted at | signal | 1st exit | resume exit | rounds | `audit verify --witness` | "
             "max weight difference to uninterrupted | accuracy | trainings per encoder | Ray processes left | "
             "outcome |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['event']}` | {r['signal']} | {r['first_exit']} | {_num(r['resume_exit'])} | "
                     f"{r.get('rounds', '-')} | {r.get('verify_line', '-')} | {_num(r.get('distance'))} | "
                     f"{_num((r.get('accuracy') or {}).get('avg'))} | {r.get('trainings_per_encoder', '-')} | "
                     f"{r['left_processes']} | {r['outcome']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--signals", nargs="+", default=["sigint", "sigkill"], choices=["sigint", "sigkill"])
    parser.add_argument("--events", nargs="+", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="resume-matrix-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SECUREFPT_HOME": str(work / "home"), "COLUMNS": "200"}
    env.pop("SECUREFPT_FAULTS", None)
    runs = []
    for name in ("uninterrupted", "uninterrupted-again"):
        done = subprocess.run(command(work / name, args.rounds), capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"the uninterrupted run failed: {done.stderr[-2000:]}")
        runs.append(encoder(work / name))
    noise = distance(runs[1], runs[0])
    accuracies = [json.loads((work / n / "summary.json").read_text())["final"]["accuracy"]
                  for n in ("uninterrupted", "uninterrupted-again")]
    baseline = {"encoder": runs[0], "accuracy": accuracies[0]}
    print(f"machine: {os.cpu_count()} cores; {args.rounds} rounds; two uninterrupted runs: max weight difference "
          f"{noise:.3g}, accuracy {accuracies[0]['avg']:.3f} and {accuracies[1]['avg']:.3f}", flush=True)
    ray_before = ray_processes()
    rows = []
    for event in args.events or events(args.rounds):
        for signal_name in args.signals:
            rows.append(cell(event, signal_name, args.rounds, work, env, baseline))
            r = rows[-1]
            print(f"{r['event']:<34} {r['signal']:<8} first {r['first_exit']:>4} resume {_num(r['resume_exit']):>3} "
                  f"{r['outcome']} distance={_num(r.get('distance'))} "
                  f"({r['seconds']} s)", flush=True)
    waited = time.perf_counter()
    while ray_processes() > ray_before and time.perf_counter() - waited < 300:
        time.sleep(5)
    gone = f"{time.perf_counter() - waited:.0f} s" if ray_processes() <= ray_before else "not within 300 s"
    (work / "resume-matrix.json").write_text(json.dumps({"noise": noise, "baseline_accuracy": accuracies,
                                                         "ray_processes_gone_after": gone, "rows": rows}, indent=1))
    print(table(rows))
    print(f"Ray processes left by killed runs were gone {gone} after the last cell")
    print(f"{sum(r['resumed'] for r in rows)} of {len(rows)} cells resumed; details in {work / 'resume-matrix.json'}")


if __name__ == "__main__":
    main()
