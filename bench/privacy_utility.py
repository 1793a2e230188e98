"""The privacy-utility curve: federated prompt tuning at several epsilons and without DP.

Each client's noise multiplier is derived with Opacus from the whole run's planned
steps so that its epsilon after the last round equals the target. Where the config
personalizes, each row also has the nodes' personalized models (their local head and
adaptation stay on the node and spend no budget towards the coordinator).

    python bench/privacy_utility.py server/masakhanews.yaml [--epsilons 1 4 8] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from securefpt.config import load_config
from securefpt.engines.runner import run_experiment


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", type=Path)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-privacy"))
    args = parser.parse_args()

    rows = []
    for eps in [*args.epsilons, None]:
        dp = ["dp.enabled=false"] if eps is None else ["dp.enabled=true", f"dp.target_epsilon={eps}"]
        cfg = load_config(args.config, args.overrides + dp)
        run_dir = args.out / (f"eps{eps:g}" if eps else "no-dp")
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time
        summary = run_experiment(cfg, run_dir, show_progress=False)
        spent = summary["privacy"]["epsilon"]
        sigmas = summary["privacy"]["noise_multiplier"] or {}
        personal = summary["final"].get("personalized_accuracy")
        rows.append((eps, summary["final"]["accuracy"], max(spent.values()) if eps else None,
                     min(sigmas.values()) if sigmas else None, max(sigmas.values()) if sigmas else None, personal))
        print(f"epsilon {eps}: avg accuracy {summary['final']['accuracy']['avg']:.3f}"
              + (f", personalized {personal['avg']:.3f}" if personal else ""), flush=True)
    languages = cfg.data.languages
    print()
    print("| target epsilon | noise multiplier (min-max) | max epsilon spent | model | " + " | ".join(languages)
          + " | avg |")
    print("|---" * (len(languages) + 5) + "|")
    for eps, acc, spent, smin, smax, personal in rows:
        sigma = f"{smin:.2f}-{smax:.2f}" if smin is not None else "-"
        head = f"| {eps:g} | {sigma} | {spent:.3f} |" if spent is not None else "| no DP | - | - |"
        for model, values in (("global", acc), ("personalized", personal)):
            if values:
                print(head, model, "|", " | ".join(f"{values[lang]:.3f}" for lang in languages),
                      f"| **{values['avg']:.3f}** |")
    (args.out / "privacy_utility.json").write_text(json.dumps([{"epsilon": r[0], "accuracy": r[1],
                                                                 "personalized": r[5]} for r in rows]))
    _plot(rows, args.out / "privacy_utility.png")


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp_rows = [r for r in rows if r[0] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r[0] for r in dp_rows], [r[1]["avg"] for r in dp_rows], "o-", label="DP-SGD (avg over languages)")
    no_dp = [r for r in rows if r[0] is None]
    if no_dp:
        ax.axhline(no_dp[0][1]["avg"], color="k", linestyle="--", label="no DP")
    ax.set_xlabel("target epsilon per client (whole run)")
    ax.set_ylabel("accuracy (dev)")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
