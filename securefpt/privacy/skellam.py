"""The accountant of distributed DP: Renyi DP of the Skellam mechanism under Poisson sampling.

A node's noise share is Skellam (the difference of two Poisson draws), so the sum over any
cohort is Skellam again, with the summed variance: the coordinator sees a sum carrying exactly
the noise the nodes calibrated, in integers, with no floating-point noise to attack.

- `skellam_rdp`: Agarwal, Kairouz, Liu 2021 ("The Skellam Mechanism for Differentially
  Private Federated Learning", Thm. 3.5), for an integer query with L2 / L1 sensitivities
  l2, l1 and noise variance mu per coordinate: alpha l2^2 / (2 mu) plus a correction that
  vanishes as mu grows (taken here with 2 alpha in place of 2 alpha - 1: never smaller);
- `subsampled_rdp`: the mechanism under Poisson sampling with rate q, at integer orders: the
  binomial expansion of E_P[(1 - q + q Q/P)^alpha] with each moment E_P[(Q/P)^k] bounded by
  the mechanism's RDP at order k (Mironov, Talwar, Zhang 2019 derive the same sum for the
  Gaussian). First, joint convexity (exp((alpha - 1) D_alpha) is jointly convex for alpha >= 1)
  bounds the real pair, a mixture over the other records' sample and over the added record's
  randomized rounding, by its worst component: Skellam noise P around a fixed sum and the same
  shifted by one integer vector v (|v|_2 <= l2, |v|_1 <= l1). For that pair the expansion is
  the "remove a record" direction exactly. The "add" direction is never larger for a
  symmetric pair, one whose reflection z -> v - z swaps P and Q, as a Skellam shift is: the
  privacy-loss distribution of such a pair is a mixture of randomized-response pairs
  {t, 1/t}, and for each (1 - q + q t)^a + t (1 - q + q/t)^a >=
  (1 - q + q t)^(1-a) + t (1 - q + q/t)^(1-a) (checked on a dense grid of t, q and every order
  used here: tests/test_distributed_dp.py, not proven here; Mironov et al. prove the Gaussian
  case). Zhu and Wang's bound for any mechanism (2019, Thm. 6) pays up to 3x on the higher
  terms for not knowing that symmetry: 1.1x-3.9x the noise for the same epsilon at q =
  0.01-0.33 (bench/accountants.py);
- `epsilon`: the (epsilon, delta) of a history that may mix Opacus's Gaussian steps (local
  DP-SGD) with Skellam steps (distributed DP), composed in RDP and converted by Opacus.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache

import numpy as np

ORDERS = tuple(range(2, 65)) + (80, 96, 128, 192, 256)


def skellam_rdp(alpha: int, mu: float, l2: float, l1: float) -> float:
    """RDP at order `alpha` of adding Skellam noise of variance `mu` to a query of sensitivities l2, l1."""
    return alpha * l2**2 / (2 * mu) + min((2 * alpha * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))


def _log_add(values: np.ndarray) -> float:
    top = float(np.max(values))
    return top + math.log(float(np.sum(np.exp(values - top))))


def subsampled_rdp(alpha: int, q: float, rdp) -> float:
    """RDP at integer order `alpha` of a symmetric mechanism with RDP curve `rdp` run on a Poisson sample
    of rate q: log(sum_k C(alpha, k) (1 - q)^(alpha - k) q^k exp((k - 1) rdp(k))) / (alpha - 1)."""
    if q >= 1.0:
        return rdp(alpha)
    if q <= 0.0:
        return 0.0
    lq, l1q = math.log(q), math.log1p(-q)
    terms = [(alpha - 1) * l1q + math.log(alpha * q - q + 1)]  # k = 0 and 1: E_P[(Q/P)^0] = E_P[Q/P] = 1
    terms += [math.log(math.comb(alpha, k)) + (alpha - k) * l1q + k * lq + (k - 1) * rdp(k)
              for k in range(2, alpha + 1)]
    return max(_log_add(np.array(terms)) / (alpha - 1), 0.0)


@lru_cache(maxsize=4096)
def skellam_step_rdp(noise_multiplier: float, q: float, l2: float, l1: float) -> tuple[float, ...]:
    """One subsampled Skellam step's RDP at every order of ORDERS (noise variance (sigma l2)^2)."""
    mu = (noise_multiplier * l2) ** 2
    curve = lru_cache(maxsize=None)(lambda a: skellam_rdp(a, mu, l2, l1))
    return tuple(subsampled_rdp(a, q, curve) for a in ORDERS)


@lru_cache(maxsize=4096)
def gaussian_step_rdp(noise_multiplier: float, q: float) -> tuple[float, ...]:
    """One step of Opacus's subsampled Gaussian (local DP-SGD), at the same orders."""
    from opacus.accountants.analysis.rdp import compute_rdp

    return tuple(float(x) for x in compute_rdp(q=q, noise_multiplier=noise_multiplier, steps=1, orders=list(ORDERS)))


def epsilon(history: tuple[tuple, ...], delta: float) -> float:
    """Epsilon at `delta` of a history of (sigma, q, steps) Gaussian entries and (sigma, q, steps, l2, l1)
    Skellam entries, composed in RDP."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    total = np.zeros(len(ORDERS))
    for entry in history:
        sigma, q, steps = entry[:3]
        step = skellam_step_rdp(*entry[:2], *entry[3:]) if len(entry) == 5 else gaussian_step_rdp(sigma, q)
        total += int(steps) * np.array(step)
    if not total.any():
        return 0.0
    with warnings.catch_warnings():  # integer orders start at 2: "optimal order is the smallest" is expected
        warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
        eps, _ = get_privacy_spent(orders=list(ORDERS), rdp=total, delta=delta)
    return float(eps)


def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, rounds: int, l2: float,
                         l1: float) -> float:
    """The smallest noise multiplier of the sum (to 0.1%) whose `rounds` Skellam steps at `sample_rate`
    stay within `target_epsilon`: planning a distributed-DP run, as Opacus's get_noise_multiplier does
    for DP-SGD. Plan with the smallest (l2, l1) a node accepts: the correction only shrinks above it."""
    def spent(sigma: float) -> float:
        return epsilon(((sigma, sample_rate, rounds, l2, l1),), delta)

    low, high = 0.05, 1.0
    while spent(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon} in {rounds} rounds")
    while high / low > 1.001:
        mid = math.sqrt(low * high)
        low, high = (low, mid) if spent(mid) <= target_epsilon else (mid, high)
    return high
