"""Distributed DP's public arithmetic: the integer grid, the rounded sensitivity, each node's noise
share and whether a ring can carry the sum. Both sides compute it from public values only (the
request, the SecAgg+ parameters); a node checks every figure itself before it adds its share.

A node sends x_k = -(sum_i round(s clip(g_i)) + Z_k) / (s b): per-example gradients clipped to C,
scaled by s onto the integer grid, rounded one example at a time (conditional randomized
rounding, so one example moves the integer sum by at most `l2`), plus its Skellam share Z_k.
With s = T / (2 c b) (T the quantization range, c the clipping range, b the request's expected
batch), Flower's SecAgg+ quantizer maps x_k back to exactly these integers, so the coordinator
unmasks integers whose noise is the sum of the shares (Kairouz, Liu, Steinke 2021).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

# A scale below this rounds so coarsely that the rounded sensitivity grows by more than 1%: refused.
MAX_ROUNDING_GROWTH = 1.01
TAIL = 10.0  # noise tail in standard deviations that must fit the clipping range


@dataclass(frozen=True)
class Ring:
    """The SecAgg+ parameters of one round, as the node's own protocol state holds them."""

    clipping_range: float
    quantization_range: int
    modulus_range: int
    threshold: int
    shares: int
    max_weight: float


def integer_scale(ring: Ring, batch_size: int) -> float:
    """s: the grid on which a clipped gradient sum divided by b lands on Flower's quantization steps."""
    return ring.quantization_range / (2.0 * ring.clipping_range * batch_size)


def rounded_sensitivity(scaled_clip: float, dimension: int) -> tuple[float, float]:
    """(l2, l1) of one example's conditionally rounded vector when its norm before rounding is at most
    `scaled_clip` (Kairouz et al. 2021, with beta = exp(-1/2)); for integer vectors l1 <= min(l2^2, sqrt(d) l2)."""
    c, d = float(scaled_clip), float(dimension)
    l2 = min(math.sqrt(c * c + d / 4 + c + math.sqrt(d) / 2), c + math.sqrt(d))
    return l2, min(l2 * l2, math.sqrt(d) * l2)


def share_variance(noise_multiplier: float, l2: float, contributors: int) -> float:
    """Each node's Skellam variance: any `contributors` honest shares sum to (sigma l2)^2."""
    return (noise_multiplier * l2) ** 2 / contributors


def batch_tail(batch_size: int) -> float:
    """A public bound on a Poisson batch of mean b (exceeded with probability far below 1e-9)."""
    return batch_size + 8.0 * math.sqrt(batch_size) + 8.0


def ring_problem(ring: Ring, batch_size: int, max_grad_norm: float, noise_multiplier: float,
                 dimension: int) -> Optional[str]:
    """Why these SecAgg+ parameters cannot carry this node's share (None: they can).

    The sum must fit the modulus (n quantized values of at most T each), the grid must be fine
    enough that rounding adds under 1% to the sensitivity, and a batch's clipped sum plus the
    share's noise tail must stay inside the clipping range (Flower clips each coordinate)."""
    if ring.shares * ring.quantization_range >= ring.modulus_range:
        return f"{ring.shares} x quantization range {ring.quantization_range} overflows modulus {ring.modulus_range}"
    scaled = integer_scale(ring, batch_size) * max_grad_norm
    l2, _ = rounded_sensitivity(scaled, dimension)
    if l2 > MAX_ROUNDING_GROWTH * scaled:
        return f"grid too coarse: rounding grows the sensitivity {l2 / scaled:.3f}x"
    noise = TAIL * math.sqrt(share_variance(noise_multiplier, l2, max(ring.threshold, 1)))
    peak = batch_tail(batch_size) * (scaled + 1) + noise
    if peak > ring.quantization_range / 2:
        return f"a batch's sum with its noise tail ({peak:.0f}) exceeds half the quantization range"
    return None


def smallest_rounded_sensitivity(max_grad_norm: float, dimension: int) -> tuple[float, float]:
    """The smallest (l2, l1) a node accepts (at the coarsest grid it allows): planning with it never
    understates the Skellam correction, which shrinks as the grid gets finer."""
    low, high = 1.0, 1e9
    for _ in range(100):
        mid = math.sqrt(low * high)
        if rounded_sensitivity(mid, dimension)[0] <= MAX_ROUNDING_GROWTH * mid:
            high = mid
        else:
            low = mid
    return rounded_sensitivity(high, dimension)


def clipping_range_for(batch_size: int, max_grad_norm: float, noise_multiplier: float, threshold: int) -> float:
    """The coordinator's default SecAgg+ clipping range in distributed mode: the smallest power of two
    whose range holds a batch's clipped sum and the noise tail (as `ring_problem` checks)."""
    need = max_grad_norm * (batch_tail(batch_size) + TAIL * noise_multiplier * 1.02 / math.sqrt(threshold))
    need = need * 1.05 / batch_size
    return float(2.0 ** math.ceil(math.log2(need)))
