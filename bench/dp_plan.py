"""Which DP-SGD recipes a node accepts, and how much noise each step carries, before anything trains.

For each node's pool size, target epsilon and Poisson batch size, the node's own planner
(securefpt/node/budget.py, Opacus's accountant) derives the noise multiplier for the whole
run, and the noise-to-signal ratio sigma sqrt(d) / B that a node refuses above 10
(`noise-swamps-signal`). d is the experiment's trainable size (prompt and head, all inside
DP-SGD). The measured accuracies of some of these recipes are in docs/benchmarks.md.

    python bench/dp_plan.py server/masakhanews.yaml [--set key=value ...] \\
        [--sizes 48 411 948] [--epsilons 1 4 8] [--batches 16 32 64 128]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from securefpt.experiment.loading import load_config
from securefpt.experiment.trial_data import label_space
from securefpt.learning.modeling import build_model, count_params
from securefpt.node.budget import MAX_NOISE_TO_SIGNAL, noise_to_signal, plan_privacy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    # 48: the 48-row protocol; 411-948: each language's whole test.tsv (yor, fra, swa, hau, eng)
    parser.add_argument("--sizes", type=int, nargs="+", default=[48, 411, 422, 476, 637, 948])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64, 128])
    args = parser.parse_args()

    cfg = load_config(args.config, args.overrides + ["dp.enabled=true"])
    labels = label_space(cfg.data)
    trainable, _ = count_params(build_model(cfg.model, cfg.peft, len(labels), cfg.seed).model)
    print(f"{cfg.name}: d = {trainable:,} trainable parameters, {cfg.fl.rounds} rounds x {cfg.fl.local_epochs} "
          f"epoch(s), delta {cfg.dp.delta:g}, {cfg.dp.accountant} accountant; a node refuses a ratio above "
          f"{MAX_NOISE_TO_SIGNAL:g}\n")
    print("| rows | epsilon | batch | q | steps | sigma | noise-to-signal | node |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for epsilon in args.epsilons:
            for batch in args.batches:
                if batch > size:
                    continue
                recipe = cfg.model_copy(update={"dp": cfg.dp.model_copy(update={"target_epsilon": epsilon}),
                                                "fl": cfg.fl.model_copy(update={"batch_size": batch})})
                request = recipe.request(labels)
                plan = plan_privacy(request, size)
                ratio = noise_to_signal(plan, size, trainable)
                verdict = "refuses" if ratio > MAX_NOISE_TO_SIGNAL else "accepts"
                print(f"| {size} | {epsilon:g} | {batch} | {plan.sample_rate:.3f} | "
                      f"{plan.steps_per_round * plan.planned_rounds} | {plan.noise_multiplier:.2f} | {ratio:.2f} | "
                      f"{verdict} |", flush=True)


if __name__ == "__main__":
    main()
