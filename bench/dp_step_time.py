"""Step time of DP-SGD (Opacus) against plain training: same model, same batches, one run.

Packaged MiniLM, batch 16, length 128 (MasakhaNEWS text when ../shared/data is there,
else the demo set), one client's local epoch. Reported: seconds per step of each and
the ratio, for each PEFT method that supports DP.

    python bench/dp_step_time.py [--examples 64] [--max-length 128] [--methods prompt_tuning p_tuning lora]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from securefpt.experiment.loading import load_config
from securefpt.experiment.trial_data import label_space, load_client_data
from securefpt.learning.dp_training import DPSchedule, dp_train
from securefpt.learning.modeling import build_model
from securefpt.learning.training import train_local
from securefpt.node.budget import plan_privacy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--methods", nargs="+", default=["prompt_tuning", "p_tuning", "lora"])
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "masakhanews"
    data = (["data.source=masakhanews_tsv", f"data.root={root}", "data.train_split=test", "data.eval_split=dev"]
            if (root / "eng" / "test.tsv").is_file() else ["data.source=demo"])
    print(f"torch threads {torch.get_num_threads()}, {data[0]}, {args.examples} examples, length {args.max_length}")
    print("| method | plain s/step | DP s/step | DP / plain |")
    print("|---|---|---|---|")
    for method in args.methods:
        cfg = load_config(None, data + [f"model.max_length={args.max_length}", f"peft.method={method}",
                                        "dp.enabled=true", "fl.batch_size=16", "fl.rounds=1"])
        labels = label_space(cfg.data)
        examples = load_client_data(cfg.data, "eng", labels, 0).train[: args.examples]
        # warm up both paths once, then time one local epoch of each
        plan = plan_privacy(cfg.request(labels), len(examples))
        schedule = DPSchedule(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round, plan.max_grad_norm)
        dp_train(build_model(cfg.model, cfg.peft, len(labels), 0), examples[:16], cfg.training_plan(),
                 DPSchedule(plan.noise_multiplier, 1.0, 1, plan.max_grad_norm))
        plain = train_local(build_model(cfg.model, cfg.peft, len(labels), 0), examples, cfg.training_plan(), seed=1)
        dp = dp_train(build_model(cfg.model, cfg.peft, len(labels), 0), examples, cfg.training_plan(), schedule)
        p, d = plain.seconds / plain.steps, dp.seconds / dp.steps
        print(f"| {method} | {p:.3f} | {d:.3f} | {d / p:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
