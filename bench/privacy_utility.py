"""The privacy-utility curve: federated prompt tuning at several epsilons and without DP.

`--mode local` (DP-SGD on each node): each client's noise multiplier is derived with Opacus
from the whole run's planned steps so that its epsilon after the last round equals the
target. `--mode distributed` (DP-FedSGD under SecAgg+, one noisy gradient per node per
round): the noise multiplier of the sum is planned with the Skellam accountant at the
nodes' sampling rate (batch over the row cap; without a cap, over the fewest rows of any
node) and the smallest rounded sensitivity a node accepts, so every node's ledger ends at or
below the target. Where the config personalizes, each row also has the nodes' personalized
models.

    python bench/privacy_utility.py server/masakhanews.yaml [--epsilons 1 4 8] [--mode distributed]
        [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from securefpt.engines.dp_planning import central_noise, distributed_noise
from securefpt.engines.privacy_audit import claimed_epsilon
from securefpt.engines.runner import run_experiment
from securefpt.experiment.loading import load_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", type=Path)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--mode", choices=["local", "distributed"], default="local")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run without DP")
    parser.add_argument("--anchors", action="store_true",
                        help="distributed mode: also the same recipe with a trusted server's noise for each epsilon "
                             "(Opacus's PRV accountant for the subsampled Gaussian) and with (almost) no noise")
    parser.add_argument("--only", nargs="+", help="run only these settings (eps8, central-eps8, no-dp, ...)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-privacy"))
    args = parser.parse_args()

    rows = []
    for name, eps, dp in _variants(args):
        if args.only and name not in args.only:
            continue
        cfg = load_config(args.config, args.overrides + dp)
        run_dir = args.out / name
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time
        summary = run_experiment(cfg, run_dir, show_progress=False)
        sigmas = summary["privacy"]["noise_multiplier"] or {}
        rounds = summary["rounds"]
        rows.append({"setting": name, "epsilon": eps, "accuracy": summary["final"]["accuracy"],
                     "personalized": summary["final"].get("personalized_accuracy"),
                     "epsilon_spent": claimed_epsilon(summary),
                     "noise_multiplier": sorted(set(sigmas.values())) if sigmas else None,
                     "round_seconds": statistics.median(r["seconds"] for r in rounds),
                     "train_seconds": statistics.median(r["train_seconds"] for r in rounds)})
        print(f"{name}: avg accuracy {summary['final']['accuracy']['avg']:.3f}, median round "
              f"{rows[-1]['round_seconds']:.1f} s (training {rows[-1]['train_seconds']:.1f} s)", flush=True)
    languages = cfg.data.languages
    print()
    print("| setting | noise multiplier | max epsilon spent | round (train) s | model | " + " | ".join(languages)
          + " | avg |")
    print("|---" * (len(languages) + 6) + "|")
    for r in rows:
        sigma = "-".join(f"{s:.3g}" for s in r["noise_multiplier"][::max(len(r["noise_multiplier"]) - 1, 1)]) \
            if r["noise_multiplier"] else "-"
        spent = f"{r['epsilon_spent']:.3f}" if r["epsilon_spent"] is not None else "-"
        head = f"| {r['setting']} | {sigma} | {spent} | {r['round_seconds']:.1f} ({r['train_seconds']:.1f}) |"
        for model, values in (("global", r["accuracy"]), ("personalized", r["personalized"])):
            if values:
                print(head, model, "|", " | ".join(f"{values[lang]:.3f}" for lang in languages),
                      f"| **{values['avg']:.3f}** |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "privacy_utility.json").write_text(json.dumps(rows, indent=1))
    _plot(rows, args.out / "privacy_utility.png", args.mode)


def _variants(args) -> list[tuple[str, float | None, list[str]]]:
    """(run folder, target epsilon, dp overrides) of each run."""
    out = []
    for eps in args.epsilons:
        dp = ["dp.enabled=true", f"dp.target_epsilon={eps}", f"dp.mode={args.mode}"]
        if args.mode == "distributed":  # sigma 1 only to read the config, then planned
            cfg = load_config(args.config, args.overrides + dp + ["dp.noise_multiplier=1"])
            sigma = distributed_noise(cfg, eps)
            print(f"epsilon {eps:g}: noise multiplier of the sum {sigma:.3f}", flush=True)
            out.append((f"eps{eps:g}", eps, dp + [f"dp.noise_multiplier={sigma}"]))
            if args.anchors:  # what a trusted server would add for eps; the nodes' Skellam ledgers then exceed it
                central = central_noise(cfg, eps)
                print(f"epsilon {eps:g}: a trusted server's noise multiplier {central:.3f}", flush=True)
                out.append((f"central-eps{eps:g}", eps, dp[:1] + ["dp.target_epsilon=null", "dp.mode=distributed",
                                                                 f"dp.noise_multiplier={central}"]))
        else:
            out.append((f"eps{eps:g}", eps, dp))
    if args.mode == "distributed" and args.anchors:  # the recipe itself: clipping, grid, 1e-3 of the noise
        out.append(("fedsgd-no-noise", None, ["dp.enabled=true", "dp.target_epsilon=null", "dp.mode=distributed",
                                              "dp.noise_multiplier=0.001"]))
    if not args.no_baseline:
        out.append(("no-dp", None, ["dp.enabled=false"]))
    return out


def _plot(rows: list[dict], path: Path, mode: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    curves = {"eps": f"{'DP-SGD on each node' if mode == 'local' else 'distributed DP (Skellam)'}",
              "central-eps": "a trusted server's noise (anchor)"}
    for prefix, label in curves.items():
        points = [r for r in rows if r["setting"].startswith(prefix)]
        if points:
            ax.plot([r["epsilon"] for r in points], [r["accuracy"]["avg"] for r in points], "o-", label=label)
    for setting, style in (("no-dp", "--"), ("fedsgd-no-noise", ":")):
        for r in (r for r in rows if r["setting"] == setting):
            ax.axhline(r["accuracy"]["avg"], color="k", linestyle=style, label=setting)
    ax.set_xlabel("target epsilon per node (whole run)")
    ax.set_ylabel("accuracy (dev, avg over languages)")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
