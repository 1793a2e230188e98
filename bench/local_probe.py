"""One node's local prompt tuning (no DP, no federation) at a few settings: a cheap probe for tuning
a backbone's learning rate, input prefix or pooling on MasakhaNEWS dev data before federated runs.

    python bench/local_probe.py --languages hau swa --rows 48 --epochs 10 \\
        --setting lr=0.005 --setting lr=0.02 --setting lr=0.05 --setting "lr=0.02,prefix=query: "

Each setting is comma-separated `lr=`, `prefix=`, `pooling=` (mean | cls); the first setting is the
baseline the others are compared with, in the same run. Prints accuracy on `--eval` dev rows.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from securefpt.experiment.config import DataConfig
from securefpt.experiment.trial_data import load_client_data
from securefpt.learning.modeling import build_model
from securefpt.learning.training import evaluate, train_local
from securefpt.protocol.request import ModelConfig, TrainingPlan, parse_peft

LABELS = ["business", "entertainment", "health", "politics", "religion", "sports", "technology"]


def _setting(text: str) -> dict:
    out = {"lr": 0.005, "prefix": "", "pooling": "mean"}
    for part in text.split(","):
        key, _, value = part.partition("=")
        out[key.strip()] = float(value) if key.strip() == "lr" else value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:multilingual-e5-small")
    parser.add_argument("--root", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                       "masakhanews"))
    parser.add_argument("--languages", nargs="+", default=["hau", "swa"])
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--eval", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--setting", action="append", default=None)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"machine: {os.cpu_count()} cores; model {args.model}; {args.rows} rows, {args.epochs} epochs, "
          f"{args.eval} dev rows")
    results: dict[str, dict[str, float]] = {}
    for text in args.setting or ["lr=0.005", "lr=0.02"]:
        s = _setting(text)
        for lang in args.languages:
            data_cfg = DataConfig(source="masakhanews_tsv", root=args.root, languages=[lang], train_split="test",
                                  eval_split="dev", max_train_per_client=args.rows, max_eval_per_client=args.eval)
            data = load_client_data(data_cfg, lang, LABELS, 0)
            model_cfg = ModelConfig(name=args.model, max_length=128, input_prefix=s["prefix"], pooling=s["pooling"])
            assembled = build_model(model_cfg, parse_peft(), len(LABELS), 0)
            start = time.perf_counter()
            plan = TrainingPlan(rounds=1, local_epochs=args.epochs, batch_size=16, lr=s["lr"], weight_decay=0.0,
                                eval_batch_size=64)
            train_local(assembled, data.train, plan, 0)
            acc = evaluate(assembled, data.eval, 64).accuracy
            results.setdefault(text, {})[lang] = acc
            print(f"{text!r} {lang}: {acc:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    base = next(iter(results))
    print("\n| setting | " + " | ".join(args.languages) + " | avg | vs first |")
    print("|---" * (len(args.languages) + 3) + "|")
    for text, accs in results.items():
        avg = sum(accs.values()) / len(accs)
        base_avg = sum(results[base].values()) / len(results[base])
        print(f"| {text} | " + " | ".join(f"{accs[lang]:.3f}" for lang in args.languages)
              + f" | {avg:.3f} | {avg - base_avg:+.3f} |")


if __name__ == "__main__":
    main()
