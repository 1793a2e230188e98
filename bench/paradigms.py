"""Accuracy of federated (global and personalized) vs monolingual vs centralized prompt tuning, same budget.

Runs one experiment config as the local paradigms (Section 4.2 of the paper) and as one
federated run per variant, and prints per-language and average accuracy as a markdown
table, the personalized-minus-monolingual gaps, and a bar plot. Every federated node and
the monolingual baseline get the same epochs: `fl.rounds x fl.local_epochs` plus
`personalization.adapt_epochs` (the baseline's last block).

    python bench/paradigms.py server/masakhanews.yaml [--set key=value ...] \\
        [--variant fedper=personalization.local_head=true,fl.server_optimizer.name=fedavgm] \\
        [--paradigms monolingual centralized] [--out runs/bench-paradigms] [--reuse]

`--reuse` keeps a run whose folder already holds a `summary.json` of the same config (a
long benchmark can then be resumed run by run); its wall time is the one recorded then.

A variant is NAME=overrides (comma-separated key=value); without --variant: `fedavg`
(no overrides) and `fedper` (a local head).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from securefpt.engines.runner import run_experiment
from securefpt.experiment.loading import load_config

DEFAULT_VARIANTS = ["fedavg=", "fedper=personalization.local_head=true"]


def _variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    return name, [o for o in overrides.split(",") if o]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--variant", dest="variants", action="append", default=None)
    parser.add_argument("--paradigms", nargs="*", default=["monolingual", "centralized"])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-paradigms"))
    parser.add_argument("--reuse", action="store_true", help="keep finished runs of the same config")
    args = parser.parse_args()

    runs = [(p, p, [f"paradigm={p}"]) for p in args.paradigms]
    runs += [(name, "federated", ["paradigm=federated", *extra])
             for name, extra in map(_variant, args.variants or DEFAULT_VARIANTS)]
    results: dict[str, dict] = {}
    for name, paradigm, extra in runs:
        cfg = load_config(args.config, args.overrides + extra)
        summary, seconds = _finished(args.out / name, cfg) if args.reuse else (None, None)
        if summary is None:
            start = time.perf_counter()
            shutil.rmtree(args.out / name, ignore_errors=True)  # a fresh run each time
            summary = run_experiment(cfg, args.out / name, show_progress=False)
            seconds = time.perf_counter() - start
            (args.out / name / "bench.json").write_text(json.dumps({"seconds": seconds}))
        final = summary["final"]
        label = f"{name} (global)" if paradigm == "federated" else name
        results[label] = {"accuracy": final["accuracy"], "seconds": seconds}
        personalized = _personalized(final, args.out / name, cfg.data.languages)
        if personalized:
            results[f"{name} (personalized)"] = {"accuracy": personalized, "seconds": seconds}
        print(f"{name}: avg={final['accuracy']['avg']:.3f}"
              + (f", personalized {personalized['avg']:.3f}" if personalized else "")
              + f" ({_seconds(seconds)} s)", flush=True)

    languages = cfg.data.languages
    print()
    print("| run | " + " | ".join(languages) + " | avg | wall s |")
    print("|---" * (len(languages) + 3) + "|")
    for label, r in results.items():
        acc = r["accuracy"]
        print(f"| {label} | " + " | ".join(f"{acc[lang]:.3f}" for lang in languages)
              + f" | **{acc['avg']:.3f}** | {_seconds(r['seconds'])} |")
    if "monolingual" in results:
        mono = results["monolingual"]["accuracy"]
        print()
        for label, r in results.items():
            if label != "monolingual" and label != "centralized":
                acc = r["accuracy"]
                print(f"{label} - monolingual: " + ", ".join(f"{lang} {acc[lang] - mono[lang]:+.3f}"
                                                              for lang in languages)
                      + f", avg {acc['avg'] - mono['avg']:+.3f}")
        if "centralized" in results:  # how much of pooling's gain over training alone a federated run captures
            gain = results["centralized"]["accuracy"]["avg"] - mono["avg"]
            for label, r in results.items():
                if label not in ("monolingual", "centralized") and gain > 0:
                    print(f"{label}: {(r['accuracy']['avg'] - mono['avg']) / gain:.0%} of centralized training's "
                          f"gain over monolingual ({gain:+.3f})")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "paradigms.json").write_text(json.dumps({k: v["accuracy"] for k, v in results.items()}, indent=2))
    _plot(results, languages, args.out / "paradigms.png")


def _personalized(final: dict, run_dir: Path, languages: list[str]) -> dict | None:
    """The personalized models' accuracy: as the nodes released it, or, where their rules release none
    (a DP node releases no figure of a model it adapted without DP), from the trial nodes' own logs,
    which the operator of a local benchmark holds."""
    released = final.get("personalized_accuracy") or {}
    if released.get("avg") is not None:
        return released
    logged = {}
    for lang in languages:
        log = run_dir / "nodes" / lang / "node.log"
        lines = log.read_text().splitlines() if log.is_file() else []
        entries = [json.loads(x) for x in lines if '"personalized"' in x]
        if not entries:
            return None
        logged[lang] = entries[-1]["accuracy"]
    return {**logged, "avg": sum(logged.values()) / len(logged)}


def _finished(folder: Path, cfg) -> tuple[dict | None, float | None]:
    """A finished run of exactly `cfg` in `folder` (its summary and recorded seconds), else (None, None)."""
    from securefpt.errors import ConfigError

    summary_path, config_path = folder / "summary.json", folder / "config.yaml"
    if not (summary_path.is_file() and config_path.is_file()):
        return None, None
    try:
        kept = load_config(config_path).model_dump()
    except ConfigError:  # a run of an older schema: not reused
        return None, None
    wanted = cfg.model_dump()
    if wanted["data"]["labels"] is None:  # a federated run writes the label space it resolved
        kept["data"]["labels"] = None
    if kept != wanted:
        return None, None
    timing = folder / "bench.json"
    seconds = json.loads(timing.read_text())["seconds"] if timing.is_file() else None
    return json.loads(summary_path.read_text()), seconds


def _seconds(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:.0f}"


def _plot(results, languages, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = list(languages) + ["avg"]
    x = np.arange(len(keys))
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, (label, r) in enumerate(results.items()):
        ax.bar(x + (i - (len(results) - 1) / 2) * width, [r["accuracy"][k] for k in keys], width, label=label)
    ax.set_xticks(x, keys)
    ax.set_ylabel("accuracy (dev)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
