"""One node's share of a distributed-DP gradient: clipped, on the integer grid, with its Skellam noise.

Per round the node draws a Poisson sample of its records (rate q: public under a row cap), computes each
example's gradient of the trainable parameters with Opacus's grad samplers (no Opacus noise),
clips it to C, scales it onto the integer grid and rounds it one example at a time with
conditional randomized rounding (redrawn until its norm is within the public bound `l2`), sums
the integers and adds Skellam noise of the share's variance. All randomness is drawn from the
operating system. The result leaves only inside SecAgg+ (node/secagg.py).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from securefpt.learning.data import Example
from securefpt.learning.dp_training import os_entropy_seed, tensor_dataset
from securefpt.learning.modeling import AssembledModel
from securefpt.learning.training import TrainResult

CHUNK_VALUES = 25_000_000  # per-example gradient values held at once (200 MB): LoRA and full tuning fit too


@dataclass(frozen=True)
class ShareSpec:
    """What the node's own privacy plan and the round's public grid fix."""

    sample_rate: float  # q: b / cap (public) where the request caps rows, else b / |D_k| (the node's own)
    max_grad_norm: float  # C
    scale: float  # s: integer grid steps per unit of gradient
    l2: float  # bound on one example's rounded vector (the query's L2 sensitivity)
    share_variance: float  # this node's Skellam variance per coordinate
    batch_size: int  # b: the public normaliser


def skellam(rng: np.random.Generator, variance: float, size: int) -> np.ndarray:
    """Symmetric Skellam: Poisson(v/2) - Poisson(v/2), variance v (sums of shares stay Skellam)."""
    return rng.poisson(variance / 2, size) - rng.poisson(variance / 2, size)


def conditional_round(rng: np.random.Generator, rows: np.ndarray, bound: float) -> np.ndarray:
    """Unbiased randomized rounding of each row, redrawn until the row's norm is at most `bound`."""
    out = np.empty(rows.shape, dtype=np.int64)
    todo = np.arange(len(rows))
    for _ in range(1000):
        if not len(todo):
            return out
        floor = np.floor(rows[todo])
        draw = floor + (rng.random(floor.shape) < rows[todo] - floor)
        ok = np.sqrt((draw**2).sum(axis=1)) <= bound
        out[todo[ok]] = draw[ok].astype(np.int64)
        todo = todo[~ok]
    raise RuntimeError("conditional rounding did not meet its bound in 1000 draws")


def per_example_gradients(assembled: AssembledModel, examples: list[Example], names: list[str]) -> np.ndarray:
    """[examples, d] gradients of the summed loss, parameters in `names` order (Opacus grad samplers)."""
    from opacus import GradSampleModule

    model = assembled.model
    model.train()
    mixed, model.autocast_dtype = model.autocast_dtype, None
    params = dict(model.named_parameters())
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
    try:
        input_ids, mask, labels = tensor_dataset(assembled, examples).tensors
        width = int(mask.sum(1).max())
        gsm.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # frozen inputs: the hook's notice is expected, not a fault
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            logits = gsm(input_ids[:, :width], mask[:, :width])
            nn.CrossEntropyLoss(reduction="sum")(logits, labels.to(logits.device)).backward()
        rows = [params[n].grad_sample.detach().reshape(len(examples), -1).to(torch.float64) for n in names]
        return torch.cat(rows, dim=1).cpu().numpy()
    finally:
        for p in params.values():
            p.grad_sample = None
            p.grad = None
        gsm._close()
        model.autocast_dtype = mixed


def gradient_share(assembled: AssembledModel, examples: list[Example], names: list[str],
                   spec: ShareSpec) -> tuple[list[np.ndarray], TrainResult]:
    """x_k = -(sum_i round(s clip(g_i)) + Z_k) / (s b), as arrays shaped like `names`' parameters."""
    start = time.perf_counter()
    rng = np.random.default_rng(os_entropy_seed())
    shapes = [tuple(dict(assembled.model.named_parameters())[n].shape) for n in names]
    dimension = int(sum(np.prod(s) for s in shapes))
    chosen = [ex for ex, keep in zip(examples, rng.random(len(examples)) < spec.sample_rate) if keep]
    total = np.zeros(dimension, dtype=np.int64)
    chunk = max(1, CHUNK_VALUES // max(dimension, 1))  # per-example gradients are [examples, d] float64
    for at in range(0, len(chosen), chunk):
        grads = per_example_gradients(assembled, chosen[at:at + chunk], names)
        norms = np.linalg.norm(grads, axis=1)
        factor = np.minimum(1.0, spec.max_grad_norm / np.maximum(norms, 1e-12))
        total += conditional_round(rng, grads * (factor * spec.scale)[:, None], spec.l2).sum(axis=0)
    total += skellam(rng, spec.share_variance, dimension)
    flat = -total.astype(np.float64) / (spec.scale * spec.batch_size)
    arrays, at = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        arrays.append(flat[at:at + size].reshape(shape))
        at += size
    return arrays, TrainResult(num_examples=len(examples), steps=1, loss=float("nan"),
                               seconds=time.perf_counter() - start)
