"""How long a run would take, from this model's step time measured on this machine.

`securefpt run --dry-run` trains nothing on anyone's data; it times the experiment's model on
a synthetic batch of the configured size and length (a warm-up step, then two): one plain
training step, one DP step where the run uses DP (per-example gradients cost more), and one
evaluation batch. A node's round is its steps (local epochs over its rows, or the DP plan's
steps) and its evaluation batches, at the public row caps; without a cap the estimate is per
100 rows. Two figures: every node on this machine (the simulation engine: the nodes share its
cores, so their compute adds up; the step was timed with all of them), and each node on a
machine like this one (the deployment engine: the slowest node sets the pace). Compute only:
the engine's start, SecAgg+'s stages and loading the model add to it, and a timed DP step
includes Opacus's per-call setup, so it errs long (bench/demo.py measures the whole).
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

from securefpt.experiment.config import ExperimentConfig
from securefpt.learning.data import Example
from securefpt.learning.modeling import AssembledModel
from securefpt.learning.training import evaluate, local_steps, train_local

PER_ROWS = 100  # without a row cap: the estimate for this many rows a node


def _synthetic(cfg: ExperimentConfig, labels: int, rows: int) -> list[Example]:
    text = " ".join(["words"] * cfg.model.max_length)  # fills max_length: the longest (slowest) batch
    return [Example(text, i % labels) for i in range(rows)]


def _seconds(fn, repeats: int = 2) -> float:
    fn()  # warm-up: first-call allocations and kernels
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def step_times(cfg: ExperimentConfig, model: AssembledModel, labels: int) -> dict[str, float]:
    """Seconds of one training step, one DP step (where DP is on) and one evaluation batch."""
    from securefpt.learning.modeling import get_trainable, set_trainable

    batch, eval_batch = _synthetic(cfg, labels, cfg.fl.batch_size), _synthetic(cfg, labels, cfg.fl.eval_batch_size)
    one_epoch = cfg.training_plan().model_copy(update={"local_epochs": 1})
    initial = get_trainable(model.model)
    times = {"train_step": _seconds(lambda: train_local(model, batch, one_epoch, seed=0)),
             "eval_batch": _seconds(lambda: evaluate(model, eval_batch, cfg.fl.eval_batch_size))}
    if cfg.dp.enabled:
        from securefpt.learning.dp_training import DPSchedule, dp_train

        schedule = DPSchedule(noise_multiplier=1.0, sample_rate=1.0, steps=1, max_grad_norm=cfg.dp.max_grad_norm)
        times["dp_step"] = _seconds(lambda: dp_train(model, batch, one_epoch, schedule))
    set_trainable(model.model, initial)
    return times


def estimate(cfg: ExperimentConfig, times: dict[str, float], included: list[str],
             dp_steps: Optional[int]) -> dict[str, Any]:
    """A round's and the run's compute seconds, on one machine and with a machine per node."""
    selected = max(int(cfg.fl.fraction_fit * len(included)), 1) if included else 0
    plan = cfg.training_plan()
    per_node = {}
    for lang in included:
        rows = cfg.data.max_train_of(lang) or PER_ROWS
        evals = cfg.data.max_eval_per_client or PER_ROWS
        if cfg.dp.enabled:
            steps = 1 if cfg.dp.mode == "distributed" else (dp_steps or local_steps(rows, plan))
            train = steps * times["dp_step"]
        else:
            train = local_steps(rows, plan) * times["train_step"]
        per_node[lang] = {"train": train, "evaluate": math.ceil(evals / cfg.fl.eval_batch_size) * times["eval_batch"]}
    trains = sorted((n["train"] for n in per_node.values()), reverse=True)[:selected]
    evals = [n["evaluate"] for n in per_node.values()]
    one_machine = sum(trains) + sum(evals)
    machine_each = (max(trains) if trains else 0.0) + (max(evals) if evals else 0.0)
    adapt = cfg.personalization.adapt_epochs
    personalize = {lang: adapt * local_steps(cfg.data.max_train_of(lang) or PER_ROWS,
                                             plan.model_copy(update={"local_epochs": 1})) * times["train_step"]
                   for lang in included} if adapt else {}
    capped = cfg.data.largest_train() is not None and cfg.data.max_eval_per_client is not None
    return {"step_seconds": times, "at_rows": "the row caps" if capped else f"{PER_ROWS} rows a node where uncapped",
            "round_seconds_one_machine": one_machine, "round_seconds_machine_each": machine_each,
            "run_seconds_one_machine": cfg.fl.rounds * one_machine + sum(personalize.values()),
            "run_seconds_machine_each": cfg.fl.rounds * machine_each + max(personalize.values(), default=0.0)}


def describe(est: dict[str, Any]) -> str:
    t = est["step_seconds"]
    dp = f", a DP step {t['dp_step']:.2f} s" if "dp_step" in t else ""
    return (f"time (compute, at {est['at_rows']}): a training step of this model takes {t['train_step']:.2f} s here"
            f"{dp}, an evaluation batch {t['eval_batch']:.2f} s; a round about "
            f"{_span(est['round_seconds_one_machine'])} with every node on this machine (simulation), "
            f"{_span(est['round_seconds_machine_each'])} with each node on a machine like this one; the run about "
            f"{_span(est['run_seconds_one_machine'])} and {_span(est['run_seconds_machine_each'])} "
            "(the engine's start, SecAgg+ and loading the model add to it)")


def _span(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
