"""Where epsilon is spent: per-client DP-SGD with Opacus and a ledger that spans rounds.

- `plan_privacy` fixes, once per client and experiment, the sampling rate q = B / |D_k|,
  the steps per round, and the noise multiplier: given, or derived with Opacus from
  the *whole run's* planned steps so that the target epsilon covers the experiment.
- `PrivacyLedger` keeps the client's accountant history (sigma, q, steps) in Flower's
  per-node Context state, so it survives the simulation engine's actor processes, and,
  where the node keeps a state folder (deployment), in a file there too, so it also
  survives a restarted coordinator's new run; its epsilon is always recomputed by
  Opacus's accountant from that history.
- `dp_train` runs the local epochs with Opacus (Poisson sampling, per-sample clipping,
  Gaussian noise) on exactly the trainable modules.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from flwr.app import ConfigRecord
from torch import nn
from torch.utils.data import TensorDataset

from securefpt.config import DPConfig, ExperimentConfig
from securefpt.data import Example
from securefpt.errors import ConfigError
from securefpt.modeling import AssembledModel
from securefpt.training import TrainResult, make_optimizer

LEDGER_KEY = "securefpt-privacy"


@dataclass(frozen=True)
class PrivacyPlan:
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_rounds: int
    delta: float
    target_epsilon: Optional[float]
    max_grad_norm: float
    accountant: str


def plan_privacy(cfg: ExperimentConfig, num_examples: int) -> PrivacyPlan:
    """The client's DP plan for the whole experiment (computed locally: |D_k| stays private)."""
    dp: DPConfig = cfg.dp
    if num_examples < 1:
        raise ConfigError("dp: a client with no training examples cannot be accounted")
    sample_rate = min(1.0, cfg.fl.batch_size / num_examples)
    steps_per_round = cfg.fl.local_epochs * max(1, int(1 / sample_rate))  # Opacus: 1/q Poisson batches an epoch
    if dp.noise_multiplier is not None:
        sigma = dp.noise_multiplier
    else:
        from opacus.accountants.utils import get_noise_multiplier

        sigma = get_noise_multiplier(
            target_epsilon=dp.target_epsilon,
            target_delta=dp.delta,
            sample_rate=sample_rate,
            steps=steps_per_round * cfg.fl.rounds,
            accountant=dp.accountant,
        )
    return PrivacyPlan(
        noise_multiplier=float(sigma), sample_rate=sample_rate, steps_per_round=steps_per_round,
        planned_rounds=cfg.fl.rounds, delta=dp.delta, target_epsilon=dp.target_epsilon,
        max_grad_norm=dp.max_grad_norm, accountant=dp.accountant,
    )


def epsilon_of(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """Opacus's epsilon for a (noise multiplier, sample rate, steps) history."""
    if not history:
        return 0.0
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta))


class PrivacyLedger:
    """A client's cumulative privacy spending, persisted in its Context state (and its ledger file)."""

    def __init__(self, history: list[tuple[float, float, int]], delta: float, accountant: str,
                 path: Optional[Path] = None) -> None:
        self.history = history
        self.delta = delta
        self.accountant = accountant
        self.path = path

    @classmethod
    def load(cls, state_records, delta: float, accountant: str, path: Optional[Path] = None) -> "PrivacyLedger":
        """From the ledger file where the node keeps one (it outlives a run), else from the Context."""
        if path is not None:
            history = json.loads(path.read_text(encoding="utf-8"))["history"] if path.is_file() else []
        else:
            rec = state_records.get(LEDGER_KEY)
            history = [] if rec is None else list(zip(rec["sigma"], rec["q"], rec["steps"]))
        return cls([(float(s), float(q), int(n)) for s, q, n in history], delta, accountant, path)

    def save(self, state_records) -> None:
        state_records[LEDGER_KEY] = ConfigRecord({
            "sigma": [float(s) for s, _, _ in self.history],
            "q": [float(q) for _, q, _ in self.history],
            "steps": [int(n) for _, _, n in self.history],
        })
        if self.path is not None:  # replaced in one step: a crash leaves the previous ledger
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"history": self.history}), encoding="utf-8")
            os.replace(tmp, self.path)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self) -> float:
        return epsilon_of(self.history, self.delta, self.accountant)

    def epsilon_after(self, plan: PrivacyPlan) -> float:
        """Epsilon if one more round of the plan were spent."""
        return epsilon_of(self.history + [(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)],
                          self.delta, self.accountant)

    def would_exceed(self, plan: PrivacyPlan, budget: Optional[float]) -> bool:
        # a small tolerance: the noise multiplier was derived to hit the target within 1%
        return budget is not None and self.epsilon_after(plan) > budget * 1.01

    def spend(self, plan: PrivacyPlan, steps: int) -> None:
        self.history.append((plan.noise_multiplier, plan.sample_rate, steps))


def _tensor_dataset(assembled: AssembledModel, examples: list[Example]) -> TensorDataset:
    enc = assembled.tokenizer([ex.text for ex in examples], truncation=True, max_length=assembled.max_text_tokens,
                              padding="max_length", return_tensors="pt")
    labels = torch.tensor([ex.label for ex in examples], dtype=torch.long)
    return TensorDataset(enc["input_ids"], enc["attention_mask"], labels)


def dp_train(assembled: AssembledModel, examples: list[Example], cfg: ExperimentConfig, plan: PrivacyPlan,
             seed: int) -> TrainResult:
    """Local epochs of DP-SGD (AdamW on privatized gradients) with Opacus.

    Poisson sampling at rate q: every step's batch is drawn independently, so the
    accountant's assumptions hold. Opacus sees the whole classifier but computes
    per-sample gradients only for the trainable parameters (prompt encoder, adapters,
    head); the frozen PLM stays in train mode as Opacus requires.
    """
    from opacus import GradSampleModule
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizer

    model = assembled.model
    model.train()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    # built with the plan's q, so the steps taken are exactly the steps accounted
    loader = DPDataLoader(_tensor_dataset(assembled, examples), sample_rate=plan.sample_rate, generator=generator)
    if len(loader) * cfg.fl.local_epochs != plan.steps_per_round:
        raise RuntimeError(f"Poisson loader takes {len(loader)} steps an epoch, the plan {plan.steps_per_round}")
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    optimizer = DPOptimizer(
        make_optimizer(model, cfg.fl),
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=max(1, round(plan.sample_rate * len(examples))),
        loss_reduction="mean",
        generator=generator,
    )
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    steps, total = 0, 0.0
    try:
        for _ in range(cfg.fl.local_epochs):
            for input_ids, mask, labels in loader:
                optimizer.zero_grad(set_to_none=True)
                if len(labels):
                    width = int(mask.sum(1).max())  # drop all-padding columns: same result, less work
                    loss = loss_fn(gsm(input_ids[:, :width], mask[:, :width]), labels)
                    loss.backward()
                    total += float(loss.detach())
                else:  # an empty Poisson batch still takes a (pure-noise) step
                    for p in model.parameters():
                        if p.requires_grad:
                            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
                optimizer.step()
                steps += 1
    finally:
        gsm._close()
    return TrainResult(num_examples=len(examples), steps=steps, loss=total / max(steps, 1),
                       seconds=time.perf_counter() - start)
