"""Empirical privacy: what an attacker's membership guesses prove about epsilon.

Two readings of the same attack scores (a higher score: the attacker believes the
record was trained on):
- `one_run_lower_bound`: the one-run audit of Steinke, Nasr and Jagielski (2023,
  "Privacy Auditing with One (1) Training Run"). Every canary was included by a fair
  coin; the attacker guesses "in" for its k+ highest scores and "out" for its k- lowest
  and abstains on the rest. For an epsilon-DP training the number of correct guesses
  among r is dominated by Binomial(r, e^eps / (1 + e^eps)); an epsilon for which the
  observed count is too unlikely (p <= beta) is refuted, and the largest refuted epsilon
  is the lower bound. The guess counts tried are corrected for (Bonferroni). The pure-DP
  form of the theorem is used (the delta term is left out), so the bound reads as an
  epsilon at delta = 0 and is slightly optimistic where delta is not negligible.
- `membership`: the membership-inference figures the field reports (Carlini et al.
  2022): ROC AUC and the true-positive rate at a low false-positive rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

CONFIDENCE = 0.95
GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.5)  # k+ (and k- in the two-sided tries) as a share of the canaries


def _refuted(eps: float, guesses: int, correct: int, beta: float) -> bool:
    p = 1.0 / (1.0 + math.exp(-eps))
    return binom.sf(correct - 1, guesses, p) <= beta


def epsilon_refuted(guesses: int, correct: int, beta: float) -> float:
    """The largest epsilon that `correct` right guesses out of `guesses` refute at level beta (0: none)."""
    if guesses == 0 or not _refuted(0.0, guesses, correct, beta):
        return 0.0
    lo, hi = 0.0, 1.0
    while _refuted(hi, guesses, correct, beta) and hi < 64:
        lo, hi = hi, hi * 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _refuted(mid, guesses, correct, beta) else (lo, mid)
    return lo


@dataclass(frozen=True)
class LowerBound:
    epsilon: float
    guesses: int  # r = k+ + k- of the best try
    correct: int
    confidence: float


def one_run_lower_bound(scores, included, confidence: float = CONFIDENCE) -> LowerBound:
    """Steinke et al.'s lower bound from canary `scores` and the coins (`included`), over a fixed
    grid of guess counts with a Bonferroni correction."""
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    m = len(scores)
    order = np.argsort(-scores, kind="stable")
    ranked = included[order]
    tries = sorted({(max(1, int(f * m)), k_neg) for f in GUESS_FRACTIONS
                    for k_neg in (0, max(1, int(f * m))) if 2 * max(1, int(f * m)) <= m})
    beta = (1 - confidence) / max(len(tries), 1)
    best = LowerBound(0.0, 0, 0, confidence)
    for k_pos, k_neg in tries:
        correct = int(ranked[:k_pos].sum()) + (int((~ranked[m - k_neg:]).sum()) if k_neg else 0)
        eps = epsilon_refuted(k_pos + k_neg, correct, beta)
        if eps > best.epsilon:
            best = LowerBound(eps, k_pos + k_neg, correct, confidence)
    return best


@dataclass(frozen=True)
class Membership:
    auc: float
    tpr_at_fpr: dict  # {0.01: ..., 0.001: ...}
    roc: tuple  # (fpr, tpr) arrays


def roc_curve(scores, members) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates of every threshold, ties taken together."""
    scores, members = np.asarray(scores, dtype=float), np.asarray(members, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], members[order]
    last_of_tie = np.r_[np.diff(s) != 0, True]
    tp, fp = np.cumsum(y)[last_of_tie], np.cumsum(~y)[last_of_tie]
    pos, neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return np.r_[0.0, fp / neg], np.r_[0.0, tp / pos]


def membership(scores, members, fprs=(0.01, 0.001)) -> Membership:
    fpr, tpr = roc_curve(scores, members)
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # the trapezoids under the curve
    at = {f: float(tpr[fpr <= f].max()) for f in fprs}  # the best threshold that keeps FPR <= f
    return Membership(auc=auc, tpr_at_fpr=at, roc=(fpr, tpr))
