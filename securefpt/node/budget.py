"""Where epsilon is spent: the node's privacy plan and its lifetime ledger per dataset.

- `plan_privacy` fixes, once per experiment, the sampling rate q = B / |D_k|, the steps
  per round and the noise multiplier (given, or derived with Opacus from the whole
  run's planned steps so that the request's target covers the experiment). |D_k| stays
  on the node.
- In distributed mode (`dp.mode: distributed`) sigma is the request's public noise multiplier
  of the sum, a round is one subsampled Skellam step, and the plan's rounded sensitivity is
  the smallest the node accepts (privacy/distributed.py): planning never understates a spend.
- `Ledger` keeps every spend of one dataset in the node's state folder, across
  experiments and restarts: (experiment, sigma, q, steps), and for a Skellam step its
  sensitivities and the honest shares it counted on. Epsilon is always recomputed from that
  history: by Opacus's accountant for DP-SGD alone, in RDP with the Skellam steps
  (privacy/skellam.py) otherwise; for the experiment (against the request's target) and for
  the dataset's whole lifetime (against the node's own budget).
- `authorize` is called where budget is spent (the train handler), offer or no offer:
  a round that would exceed either budget is refused.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

from securefpt.node.config import Budget
from securefpt.node.state import read_json, write_json
from securefpt.privacy import skellam
from securefpt.privacy.distributed import smallest_rounded_sensitivity
from securefpt.protocol.refusals import NodeRefusal
from securefpt.protocol.request import ExperimentRequest

TOLERANCE = 1.01  # the noise multiplier is derived to hit the target within 1%
# Refuse a plan whose noise would swamp the signal (docs/benchmarks.md, "Privacy-utility"):
# on MasakhaNEWS with MiniLM, a noise-to-signal ratio of 10.6 left accuracy near chance.
MAX_NOISE_TO_SIGNAL = 10.0


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
    mode: str = "local"
    rounding: tuple[float, ...] = ()  # distributed: the (l2, l1) planned for, the smallest the node accepts

    @property
    def distributed(self) -> bool:
        return self.mode == "distributed"

    def round_spend(self) -> tuple:
        return (self.noise_multiplier, self.sample_rate, self.steps_per_round, *self.rounding)


def plan_privacy(request: ExperimentRequest, num_examples: int, dimension: int = 0) -> PrivacyPlan:
    """The node's DP plan for the whole experiment (computed locally: |D_k| stays private);
    `dimension` (the trainable parameters that travel) matters in distributed mode only."""
    dp, plan = request.dp, request.training
    if num_examples < 1:
        raise NodeRefusal("data-unavailable", "no training examples to account")
    sample_rate = min(1.0, plan.batch_size / num_examples)
    if dp.distributed:  # one noisy gradient a round; sigma is the sum's, public
        if plan.max_train is not None:  # every row of the federation sampled at one public rate (central DP-SGD's
            sample_rate = min(1.0, plan.batch_size / plan.max_train)  # batch): no epsilon depends on |D_k|
        if dp.noise_multiplier is None:  # ExperimentRequest refuses distributed DP without one
            raise NodeRefusal("malformed-request", "distributed DP without the sum's noise multiplier")
        return PrivacyPlan(noise_multiplier=float(dp.noise_multiplier), sample_rate=sample_rate, steps_per_round=1,
                           planned_rounds=plan.rounds, delta=dp.delta, target_epsilon=dp.target_epsilon,
                           max_grad_norm=dp.max_grad_norm, accountant="rdp", mode="distributed",
                           rounding=smallest_rounded_sensitivity(dp.max_grad_norm, dimension))
    steps_per_round = plan.local_epochs * max(1, int(1 / sample_rate))  # Opacus: 1/q Poisson batches an epoch
    if dp.noise_multiplier is not None:
        sigma = dp.noise_multiplier
    else:
        from opacus.accountants.utils import get_noise_multiplier

        sigma = get_noise_multiplier(target_epsilon=dp.target_epsilon, target_delta=dp.delta,
                                     sample_rate=sample_rate, steps=steps_per_round * plan.rounds,
                                     accountant=dp.accountant)
    return PrivacyPlan(noise_multiplier=float(sigma), sample_rate=sample_rate, steps_per_round=steps_per_round,
                       planned_rounds=plan.rounds, delta=dp.delta, target_epsilon=dp.target_epsilon,
                       max_grad_norm=dp.max_grad_norm, accountant=dp.accountant)


def noise_to_signal(plan: PrivacyPlan, num_examples: int, dimension: int) -> float:
    """sigma sqrt(d) / B: the norm of one step's noise on the averaged gradient (sigma C sqrt(d) / B, for
    d trainable parameters and an expected batch of B = q |D_k|) over the largest signal it can
    carry (C, the clipping norm). Above ~10 the noise dominates every step: nothing trains."""
    batch = max(plan.sample_rate * num_examples, 1.0)
    return plan.noise_multiplier * math.sqrt(dimension) / batch


def check_noise(plan: PrivacyPlan, num_examples: int, dimension: int) -> None:
    """Refuse a plan whose noise would swamp the signal (the details stay in the node's log)."""
    ratio = noise_to_signal(plan, num_examples, dimension)
    if ratio > MAX_NOISE_TO_SIGNAL:
        raise NodeRefusal("noise-swamps-signal", f"noise-to-signal {ratio:.1f} > {MAX_NOISE_TO_SIGNAL} "
                          f"(sigma {plan.noise_multiplier:.2f}, q {plan.sample_rate:.3f}, d {dimension})")


def epsilon_of(history: list[tuple], delta: float, accountant: str) -> float:
    """Epsilon of a history of (noise multiplier, sample rate, steps) DP-SGD entries and
    (noise multiplier, sample rate, steps, l2, l1) Skellam entries. Steps of the same mechanism
    are one entry of their summed steps: composition does not care how they were grouped, and
    the accountant's cost then stays flat as rounds add entries."""
    merged: dict[tuple, int] = {}
    for entry in history:
        key = (float(entry[0]), float(entry[1]), *(float(x) for x in entry[3:]))
        merged[key] = merged.get(key, 0) + int(entry[2])
    entries = tuple(sorted((k[0], k[1], n, *k[2:]) for k, n in merged.items() if n > 0))
    return _epsilon(entries, float(delta), accountant)


@lru_cache(maxsize=4096)
def _epsilon(history: tuple[tuple, ...], delta: float, accountant: str) -> float:
    if not history:
        return 0.0
    if any(len(e) == 5 for e in history):  # Skellam steps: composed in RDP with any DP-SGD steps
        return skellam.epsilon(history, delta)
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


class Ledger:
    """Every DP spend on one dataset of this node, kept in its state folder."""

    def __init__(self, state_dir: Path, dataset: str, budget: Budget, federation: str = "local") -> None:
        self.path = Path(state_dir) / f"ledger-{re.sub(r'[^A-Za-z0-9_.-]', '_', dataset)}.json"
        self.budget, self.federation = budget, federation
        self.entries: list[dict] = read_json(self.path, {"entries": []})["entries"]

    def history(self, experiment: Optional[str] = None, alone: bool = False,
                federation: Optional[str] = None) -> list[tuple]:
        """The spends as accountant entries; `alone`: a Skellam step counts only this node's own share
        (the guarantee left if every other contributor colluded with the coordinator); `federation`: only
        that federation's spends (an entry from before federations were recorded counts for every one)."""
        out: list[tuple] = []
        for e in self.entries:
            if experiment is not None and e["experiment"] != experiment:
                continue
            if federation is not None and e.get("federation", federation) != federation:
                continue
            if "l2" not in e:
                out.append((e["sigma"], e["q"], e["steps"]))
            else:
                sigma = e["sigma"] / math.sqrt(e["contributors"]) if alone else e["sigma"]
                out.append((sigma, e["q"], e["steps"], e["l2"], e["l1"]))
        return out

    def steps(self, experiment: str) -> int:
        return sum(e[2] for e in self.history(experiment))

    def epsilon(self, experiment: str, plan: PrivacyPlan, extra: Sequence[tuple] = ()) -> float:
        """This experiment's epsilon (at its delta and accountant), with `extra` spends added."""
        return epsilon_of(self.history(experiment) + list(extra), plan.delta, plan.accountant)

    def epsilon_alone(self, experiment: str, plan: PrivacyPlan) -> float:
        """Distributed mode: this experiment's epsilon from this node's own noise shares alone."""
        return epsilon_of(self.history(experiment, alone=True), plan.delta, plan.accountant)

    def lifetime_epsilon(self, extra: Sequence[tuple] = ()) -> float:
        """The dataset's epsilon over every experiment (at the node's own delta and accountant)."""
        return epsilon_of(self.history() + list(extra), self.budget.delta, self.budget.accountant)

    def federation_epsilon(self, extra: Sequence[tuple] = (), federation: Optional[str] = None) -> float:
        """What one federation (this ledger's, by default) has spent of the dataset, over all its experiments."""
        return epsilon_of(self.history(federation=federation or self.federation) + list(extra), self.budget.delta,
                          self.budget.accountant)

    def _over_budget(self, extra: Sequence[tuple]) -> Optional[str]:
        if self.budget.epsilon is not None and self.lifetime_epsilon(extra) > self.budget.epsilon * TOLERANCE:
            return f"the node's lifetime budget {self.budget.epsilon:g}"
        share = self.budget.per_federation
        if share is not None and self.federation_epsilon(extra) > share * TOLERANCE:
            return f"this federation's share {share:g} of the lifetime budget"
        return None

    def _check(self, experiment: str, plan: PrivacyPlan, rounds: int) -> Optional[str]:
        extra = [plan.round_spend()] * rounds
        if plan.target_epsilon is not None and self.epsilon(experiment, plan, extra) > plan.target_epsilon * TOLERANCE:
            return "the experiment's target epsilon"
        return self._over_budget(extra)

    def rounds_left(self, experiment: str, plan: PrivacyPlan) -> int:
        """How many more rounds the experiment may spend: what is left of its plan, and no more than
        its own target allows (the largest such count; epsilon grows with every round)."""
        done = self.steps(experiment) // max(plan.steps_per_round, 1)
        low, high = 0, max(plan.planned_rounds - done, 0)
        if plan.target_epsilon is None:
            return high
        while low < high:
            mid = (low + high + 1) // 2
            if self.epsilon(experiment, plan, [plan.round_spend()] * mid) <= plan.target_epsilon * TOLERANCE:
                low = mid
            else:
                high = mid - 1
        return low

    def check_plan(self, experiment: str, plan: PrivacyPlan) -> None:
        """At setup: whatever the experiment may still spend must fit the dataset's lifetime budget and
        this federation's share of it."""
        if self.budget.epsilon is None and self.budget.per_federation is None:
            return
        which = self._over_budget([plan.round_spend()] * self.rounds_left(experiment, plan))
        if which is not None:
            raise NodeRefusal("budget-exhausted", f"the experiment could exceed {which}")

    def allows_round(self, experiment: str, plan: PrivacyPlan) -> bool:
        return self._check(experiment, plan, 1) is None

    def authorize(self, experiment: str, plan: PrivacyPlan) -> None:
        """Refuse a round that would exceed the experiment's target or the lifetime budget."""
        which = self._check(experiment, plan, 1)
        if which is not None:
            raise NodeRefusal("budget-exhausted", f"one more round would exceed {which}")

    def spend(self, experiment: str, plan: PrivacyPlan, steps: int, share: Optional[dict] = None) -> None:
        """Record a round's steps; `share` (distributed mode): the round's real l2, l1 and contributors."""
        entry = {"experiment": experiment, "sigma": plan.noise_multiplier, "q": plan.sample_rate, "steps": int(steps),
                 "federation": self.federation}
        self.entries.append({**entry, **(share or {})})
        write_json(self.path, {"entries": self.entries})


@dataclass(frozen=True)
class Accounting:
    """A DP experiment's plan and the ledger it is spent from: there exactly when the request asks for DP."""

    plan: PrivacyPlan
    ledger: Ledger
