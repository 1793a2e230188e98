"""How much noise distributed DP asks for, against a trusted server's Gaussian accounting.

For each sampling rate, number of rounds and target epsilon (delta 1e-5): the noise
multiplier of the sum that securefpt's Skellam accountant plans (privacy/skellam.py), the
one Zhu & Wang's bound for any mechanism would plan (the accountant before 2026-12-06,
computed here as the baseline), and what Opacus asks of a trusted server adding Gaussian
noise (its RDP accountant and its PRV accountant). Ratios are to the PRV figure. The
sensitivities are those of a prompt-tuning run of multilingual-e5-small (8 virtual tokens,
a shared head of 7 labels) at clip 1 on the SecAgg+ grid.

    python bench/accountants.py
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from securefpt.privacy import skellam
from securefpt.privacy.distributed import smallest_rounded_sensitivity

DELTA = 1e-5
SETTINGS = [(0.01, 400), (0.05, 100), (64 / 411, 20), (16 / 48, 30)]  # (q, rounds); the last two as measured


def zhu_wang(alpha: int, q: float, rdp) -> float:
    """Zhu & Wang 2019, Thm. 6, for any mechanism (the factor 3 on the terms of order 3 and up)."""
    lq, l1q = math.log(q), math.log1p(-q)
    terms = [(alpha - 1) * l1q + math.log(alpha * q - q + 1),
             math.log(math.comb(alpha, 2)) + 2 * lq + (alpha - 2) * l1q + rdp(2)]
    terms += [math.log(3) + math.log(math.comb(alpha, j)) + (alpha - j) * l1q + j * lq + (j - 1) * rdp(j)
              for j in range(3, alpha + 1)]
    return max(skellam._log_add(np.array(terms)) / (alpha - 1), 0.0)


def planned(spent, target: float) -> float:
    """The smallest sigma (to 0.1%) whose `spent(sigma)` stays within `target`."""
    low, high = 0.05, 64.0
    if spent(high) > target:
        raise ValueError(f"no noise multiplier up to {high} reaches epsilon {target}")
    while high / low > 1.001:
        mid = math.sqrt(low * high)
        low, high = (low, mid) if spent(mid) <= target else (mid, high)
    return high


def main() -> None:
    from opacus.accountants.utils import get_noise_multiplier

    warnings.filterwarnings("ignore")
    l2, l1 = smallest_rounded_sensitivity(1.0, 8 * 384 + 7 * 384 + 7)

    def general(sigma: float, q: float, rounds: int) -> float:
        mu = (sigma * l2) ** 2
        curve = lambda a: skellam.skellam_rdp(a, mu, l2, l1)  # noqa: E731
        from opacus.accountants.analysis.rdp import get_privacy_spent

        total = rounds * np.array([zhu_wang(a, q, curve) for a in skellam.ORDERS])
        return float(get_privacy_spent(orders=list(skellam.ORDERS), rdp=total, delta=DELTA)[0])

    print("| q | rounds | epsilon | trusted server, PRV | trusted server, RDP | securefpt (Skellam) | "
          "Zhu & Wang bound (before) |")
    print("|---|---|---|---|---|---|---|")
    for q, rounds in SETTINGS:
        for eps in (1.0, 4.0, 8.0):
            prv = get_noise_multiplier(target_epsilon=eps, target_delta=DELTA, sample_rate=q, steps=rounds,
                                       accountant="prv")
            rdp = get_noise_multiplier(target_epsilon=eps, target_delta=DELTA, sample_rate=q, steps=rounds,
                                       accountant="rdp")
            ours = skellam.noise_multiplier_for(eps, DELTA, q, rounds, l2, l1)
            before = planned(lambda s, q=q, rounds=rounds: general(s, q, rounds), eps)
            print(f"| {q:.4g} | {rounds} | {eps:g} | {prv:.3f} | {rdp:.3f} ({rdp / prv:.2f}x) | "
                  f"{ours:.3f} ({ours / prv:.2f}x) | {before:.3f} ({before / prv:.2f}x) |", flush=True)


if __name__ == "__main__":
    main()
