"""Local training and evaluation of the assembled classifier (the frozen PLM stays frozen)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from securefpt.learning.data import Example
from securefpt.learning.modeling import AssembledModel
from securefpt.protocol.request import TrainingPlan


def _collate(assembled: AssembledModel) -> Callable[[list[Example]], dict[str, torch.Tensor]]:
    def collate(batch: list[Example]) -> dict[str, torch.Tensor]:
        enc = assembled.encode(batch)
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([ex.label for ex in batch], dtype=torch.long),
        }

    return collate


def make_loader(
    assembled: AssembledModel, examples: list[Example], batch_size: int, shuffle: bool, seed: int
) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        examples,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=_collate(assembled),
    )


def make_optimizer(model: nn.Module, plan: TrainingPlan) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=plan.lr, weight_decay=plan.weight_decay)


class Proximal:
    """FedProx (Li et al. 2020): mu/2 ||w - w_start||^2 on the objective, with w_start the parameters
    at the start of local training (the global encoder). Its gradient mu (w - w_start) is added to
    `p.grad` directly; under DP-SGD after the noise (dp_training.py), since Opacus overwrites
    `p.grad` with the clipped, noised sum and would drop anything added before."""

    def __init__(self, model: nn.Module, mu: float) -> None:
        self.mu = float(mu)
        self.params = [p for p in model.parameters() if p.requires_grad] if self.mu > 0 else []
        self.start = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def add_gradient(self) -> None:
        for p, w0 in zip(self.params, self.start):
            if p.grad is not None:
                p.grad.add_(p - w0, alpha=self.mu)


@dataclass
class TrainResult:
    num_examples: int
    steps: int
    loss: float
    seconds: float


def local_steps(examples: int, plan: TrainingPlan) -> int:
    """The optimizer steps `train_local` takes: every batch of every epoch, the last one short."""
    return plan.local_epochs * -(-examples // plan.batch_size)


def train_local(
    assembled: AssembledModel,
    examples: list[Example],
    plan: TrainingPlan,
    seed: int,
    on_step: Optional[Callable[[], None]] = None,
) -> TrainResult:
    """`plan.local_epochs` epochs of AdamW on the trainable parameters (Algorithm 1, client side),
    with FedProx's proximal term where the plan sets `proximal_mu`; `on_step` after each step."""
    import time

    model = assembled.model
    model.train()
    torch.manual_seed(seed)
    loader = make_loader(assembled, examples, plan.batch_size, shuffle=True, seed=seed)
    optimizer = make_optimizer(model, plan)
    proximal = Proximal(model, plan.proximal_mu)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    steps, total_loss = 0, 0.0
    for _ in range(plan.local_epochs):
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            logits = model(batch["input_ids"], batch["attention_mask"])
            loss = loss_fn(logits, batch["labels"].to(logits.device))
            loss.backward()
            proximal.add_gradient()
            optimizer.step()
            steps += 1
            total_loss += float(loss.detach())
            if on_step is not None:
                on_step()
    return TrainResult(
        num_examples=len(examples),
        steps=steps,
        loss=total_loss / max(steps, 1),
        seconds=time.perf_counter() - start,
    )


@dataclass
class EvalResult:
    accuracy: float
    loss: float
    num_examples: int


@torch.no_grad()
def evaluate(assembled: AssembledModel, examples: list[Example], batch_size: int) -> EvalResult:
    model = assembled.model
    was_training = model.training
    model.eval()
    correct, total_loss, n = 0, 0.0, 0
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    for batch in make_loader(assembled, examples, batch_size, shuffle=False, seed=0):
        logits = model(batch["input_ids"], batch["attention_mask"]).cpu()
        total_loss += float(loss_fn(logits, batch["labels"]))
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        n += len(batch["labels"])
    model.train(was_training)
    return EvalResult(accuracy=correct / max(n, 1), loss=total_loss / max(n, 1), num_examples=n)
