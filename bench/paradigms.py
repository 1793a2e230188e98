"""Accuracy of federated vs monolingual vs centralized prompt tuning, same budget.

Runs one experiment config under the three paradigms (Section 4.2 of the paper) and
prints per-language and average accuracy as a markdown table, plus a bar plot.

    python bench/paradigms.py server/masakhanews.yaml [--set key=value ...] [--out runs/bench-paradigms]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from securefpt.config import load_config
from securefpt.engines.runner import run_experiment

PARADIGMS = ("federated", "monolingual", "centralized")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-paradigms"))
    args = parser.parse_args()

    results = {}
    for paradigm in PARADIGMS:
        cfg = load_config(args.config, args.overrides + [f"paradigm={paradigm}"])
        start = time.perf_counter()
        shutil.rmtree(args.out / paradigm, ignore_errors=True)  # a fresh run each time
        summary = run_experiment(cfg, args.out / paradigm, show_progress=False)
        results[paradigm] = (summary["final"]["accuracy"], time.perf_counter() - start)
        print(f"{paradigm}: avg={summary['final']['accuracy']['avg']:.3f} ({results[paradigm][1]:.0f}s)", flush=True)

    languages = cfg.data.languages
    print()
    print("| paradigm | " + " | ".join(languages) + " | avg | wall s |")
    print("|---" * (len(languages) + 3) + "|")
    for paradigm, (acc, secs) in results.items():
        print(f"| {paradigm} | " + " | ".join(f"{acc[lang]:.3f}" for lang in languages)
              + f" | **{acc['avg']:.3f}** | {secs:.0f} |")
    fed, mono = results["federated"][0], results["monolingual"][0]
    print()
    print("federated - monolingual: " + ", ".join(f"{lang} {fed[lang] - mono[lang]:+.3f}" for lang in languages)
          + f", avg {fed['avg'] - mono['avg']:+.3f}")
    (args.out / "paradigms.json").write_text(json.dumps({k: v[0] for k, v in results.items()}, indent=2))
    _plot(results, languages, args.out / "paradigms.png")


def _plot(results, languages, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = list(languages) + ["avg"]
    x = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (paradigm, (acc, _)) in enumerate(results.items()):
        ax.bar(x + (i - 1) * 0.27, [acc[k] for k in keys], 0.27, label=paradigm)
    ax.set_xticks(x, keys)
    ax.set_ylabel("accuracy (dev)")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
