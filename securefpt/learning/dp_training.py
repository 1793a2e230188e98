"""Local epochs of DP-SGD with Opacus, its randomness drawn from the operating system.

Poisson sampling at the plan's rate q (every step's batch drawn independently, so the
accountant's assumptions hold), per-sample clipping and Gaussian noise on exactly the
trainable modules (prompt encoder, adapters, head); the frozen PLM stays in train mode
as Opacus requires. The generator behind the sampling and the noise is re-seeded from
`os.urandom` before every step, and the noise uses Opacus's `secure_mode` (robust to
floating-point attacks): nothing the coordinator sends can make the noise predictable
or a replayed round identical.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.data import TensorDataset

from securefpt.learning.data import Example
from securefpt.learning.modeling import AssembledModel
from securefpt.learning.training import Proximal, TrainResult, make_optimizer
from securefpt.protocol.request import TrainingPlan


@dataclass(frozen=True)
class DPSchedule:
    """How DP-SGD runs: fixed by the node's privacy plan (node/budget.py)."""

    noise_multiplier: float
    sample_rate: float
    steps: int  # steps of the whole call (local epochs x 1/q)
    max_grad_norm: float


def os_entropy_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)


def tensor_dataset(assembled: AssembledModel, examples: list[Example]) -> TensorDataset:
    enc = assembled.encode(examples, padding="max_length")
    labels = torch.tensor([ex.label for ex in examples], dtype=torch.long)
    return TensorDataset(enc["input_ids"], enc["attention_mask"], labels)


def dp_train(assembled: AssembledModel, examples: list[Example], optim: TrainingPlan, schedule: DPSchedule,
             on_step: Optional[Callable[[], None]] = None) -> TrainResult:
    """`schedule.steps` DP-SGD steps (AdamW on privatized gradients; `optim` has lr and weight_decay);
    `on_step` after each step."""
    from opacus import GradSampleModule
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizer

    model = assembled.model
    model.train()
    mixed, model.autocast_dtype = model.autocast_dtype, None  # per-sample gradients in float32
    generator = torch.Generator().manual_seed(os_entropy_seed())
    loader = DPDataLoader(tensor_dataset(assembled, examples), sample_rate=schedule.sample_rate, generator=generator)
    epochs, rest = divmod(schedule.steps, len(loader))
    if rest:  # built with the plan's q, so the steps taken are exactly the steps accounted
        raise RuntimeError(f"Poisson loader takes {len(loader)} steps an epoch; {schedule.steps} were planned")
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    optimizer = DPOptimizer(
        make_optimizer(model, optim),
        noise_multiplier=schedule.noise_multiplier,
        max_grad_norm=schedule.max_grad_norm,
        expected_batch_size=max(1, round(schedule.sample_rate * len(examples))),
        loss_reduction="mean",
        generator=generator,
        secure_mode=True,
    )
    proximal = Proximal(model, optim.proximal_mu)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    steps, total = 0, 0.0
    try:
        for _ in range(epochs):
            for input_ids, mask, labels in loader:
                generator.manual_seed(os_entropy_seed())  # this step's noise and the next step's sample
                optimizer.zero_grad(set_to_none=True)
                if len(labels):
                    width = int(mask.sum(1).max())  # drop all-padding columns: same result, less work
                    logits = gsm(input_ids[:, :width], mask[:, :width])
                    loss = loss_fn(logits, labels.to(logits.device))
                    loss.backward()
                    total += float(loss.detach())
                else:  # an empty Poisson batch still takes a (pure-noise) step
                    for p in model.parameters():
                        if p.requires_grad:
                            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                if optimizer.pre_step():  # clip, noise, scale: p.grad is now the private gradient
                    proximal.add_gradient()  # FedProx after the noise (a function of public w, w_start only)
                    optimizer.original_optimizer.step()
                steps += 1
                if on_step is not None:
                    on_step()
    finally:
        gsm._close()
        model.autocast_dtype = mixed
    return TrainResult(num_examples=len(examples), steps=steps, loss=total / max(steps, 1),
                       seconds=time.perf_counter() - start)
