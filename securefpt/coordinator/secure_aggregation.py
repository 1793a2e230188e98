"""Server side of secure aggregation: Flower's SecAgg+ workflow, validated and hardened.

The server learns only the weighted sum of the selected clients' *changes* to the
global encoder and the total weight. Clients mask `ratio_k * (h_k - h_g)` with
`ratio_k = |D_k| / max_weight` (the weight travels inside the masked vector); the
workflow unmasks the sum and divides by the total ratio, so the new global encoder is
`h_g + sum_k w_k (h_k - h_g) = sum_k w_k h_k`, Algorithm 1, within the quantization
bound. The client side (guard, range check, no plaintext metadata) is in `mods.py`.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.secure_aggregation import secaggplus_workflow
from flwr.serverapp import Grid

from securefpt.coordinator.secagg_relay import AuthenticatedSecAggPlus, Relay
from securefpt.errors import ConfigError
from securefpt.experiment.config import ExperimentConfig
from securefpt.privacy.distributed import clipping_range_for
from securefpt.protocol.mask_prg import use_full_seed_masks

use_full_seed_masks()  # the nodes expand masks from the whole shared secret: unmask the same way


@dataclass(frozen=True)
class SecAggSettings:
    """The protocol parameters for one cohort size, all checked."""

    num_shares: int
    reconstruction_threshold: int
    clipping_range: float
    quantization_range: int
    modulus_range: int
    max_weight: float
    timeout: Optional[float]
    min_cohort: int
    threshold_given: bool  # secagg.reconstruction_threshold was set (else: the smallest above 2/3 of the shares)


def active_threshold(shares: int) -> int:
    """The smallest reconstruction threshold above 2n/3 (Bonawitz et al. 2017, active security):
    no two disjoint groups of honest nodes can both reach it, so split views reveal nothing."""
    return max(2, (2 * shares) // 3 + 1)


def cohort_size(cfg: ExperimentConfig, num_clients: int) -> int:
    return max(int(cfg.fl.fraction_fit * num_clients), 1)


def resolve_settings(cfg: ExperimentConfig, num_clients: int) -> SecAggSettings:
    """Validate `secagg.*` for this experiment's cohort; one-line ConfigError otherwise."""
    s = cfg.secagg
    m = cohort_size(cfg, num_clients)

    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"secagg.{key}: {why}")

    if m < 2:
        raise ConfigError(f"secure aggregation needs at least 2 clients per round, this experiment selects {m} "
                          "(raise fl.fraction_fit, add clients, or set secagg.enabled=false)")
    shares = m if s.num_shares is None else s.num_shares  # odd and >= 3 where given (SecAggConfig)
    if shares > m:
        raise bad("num_shares", f"{shares} exceeds the {m} clients selected per round")
    threshold = active_threshold(shares) if s.reconstruction_threshold is None else s.reconstruction_threshold
    if not 3 * threshold > 2 * shares:  # the nodes refuse anything weaker (node/secagg.py)
        raise bad("reconstruction_threshold", f"must be above 2/3 of the {shares} shares (at least "
                                              f"{active_threshold(shares)}), got {threshold}")
    if threshold > shares:
        raise bad("reconstruction_threshold", f"must not exceed the share count {shares}, got {threshold}")
    if m * s.quantization_range >= s.modulus_range:
        raise bad("modulus_range", f"{s.modulus_range} could overflow: {m} clients x quantization_range "
                                   f"{s.quantization_range} must stay below it")
    cap = cfg.data.largest_train()
    # The closer max_weight is to the real |D_k|, the finer the weighted update's quantization.
    max_weight = s.max_weight if s.max_weight is not None else float(cap or 1000)
    if cap is not None and cap > max_weight:
        raise bad("max_weight", f"{max_weight:g} is below a client's possible weight "
                                f"(data: a client may train on {cap} rows)")
    if s.min_cohort > m:
        raise bad("min_cohort", f"{s.min_cohort} exceeds the {m} clients selected per round")
    clipping = s.clipping_range
    if cfg.dp.distributed and "clipping_range" not in s.model_fields_set:
        # the nodes' noisy gradient shares, on their integer grid: room for a batch and the noise tail
        clipping = clipping_range_for(cfg.fl.batch_size, cfg.dp.max_grad_norm, cfg.dp.noise_multiplier,
                                      2)  # the smallest threshold a shrunken round may use
    return SecAggSettings(
        num_shares=shares, reconstruction_threshold=threshold, clipping_range=clipping,
        quantization_range=s.quantization_range, modulus_range=s.modulus_range, max_weight=max_weight,
        timeout=s.timeout if s.timeout is not None else cfg.fl.round_timeout, min_cohort=s.min_cohort,
        threshold_given=s.reconstruction_threshold is not None,
    )


class _CohortStrategy(Strategy):
    """The workflow's view of the round: a fixed cohort in, the unmasked average out."""

    def __init__(self, instructions: list[tuple[GridClientProxy, FitIns]]) -> None:
        self.instructions = instructions
        self.average: Optional[list[np.ndarray]] = None
        self.contributors: list[int] = []

    def initialize_parameters(self, client_manager):  # noqa: D102 - not used by the workflow
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return self.instructions

    def aggregate_fit(self, server_round, results: list[tuple[GridClientProxy, FitRes]], failures):
        # Every result carries the same unmasked average (the workflow sets it); no
        # per-client value is available here, by design.
        self.contributors = sorted(proxy.node_id for proxy, _ in results)
        if results:
            self.average = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


@dataclass
class SecureRoundOutcome:
    average_change: Optional["OrderedDict[str, np.ndarray]"]
    contributors: list[int] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)  # node -> its refusal, where it sent one
    why: str = ""  # why the round was aborted

    @property
    def aborted(self) -> bool:
        return self.average_change is None


def round_settings(settings: SecAggSettings, cohort: int) -> tuple[int, int]:
    """(shares, threshold) for a round of `cohort` nodes: the share graph shrinks to the cohort
    (declines, exclusions); the threshold is the smallest above 2/3 of the shares, or a set
    threshold scaled to them (never below that bound)."""
    shares = min(settings.num_shares, cohort)
    if shares < cohort and shares % 2 == 0:
        shares -= 1
    if not settings.threshold_given:
        return shares, active_threshold(shares)
    scaled = -(-settings.reconstruction_threshold * shares // settings.num_shares)  # ceiling
    return shares, min(max(active_threshold(shares), scaled), shares)


def secure_fit_round(
    grid: Grid,
    context: Context,
    settings: SecAggSettings,
    server_round: int,
    selected: list[int],
    global_arrays: "OrderedDict[str, np.ndarray]",
    fit_config: dict,
) -> SecureRoundOutcome:
    """One round of training whose updates reach the coordinator only as a SecAgg+ sum.

    The unmasked sum is checked before it is used: a total weight that is not positive
    (a node that lied about its weight) or a non-finite average aborts the round, and
    the global encoder stays as it was.
    """
    if len(selected) < max(2, settings.min_cohort):
        return SecureRoundOutcome(None, why="too few nodes for the minimum cohort")
    shares, threshold = round_settings(settings, len(selected))
    names = list(global_arrays)
    parameters: Parameters = ndarrays_to_parameters(list(global_arrays.values()))
    observed = Relay(grid, [a.shape for a in global_arrays.values()], server_round)
    run_id = grid.run.run_id
    manager = SimpleClientManager()
    instructions = []
    for node_id in selected:
        proxy = GridClientProxy(node_id, observed, run_id)
        manager.register(proxy)
        instructions.append((proxy, FitIns(parameters, {**fit_config, "secure": True})))
    strategy = _CohortStrategy(instructions)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=server_round), strategy=strategy,
                           client_manager=manager)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(parameters, True)
    # As fractions, which Flower turns back into these exact counts for this cohort; the
    # integer form rejects the two-node case (num_shares must exceed 2 there).
    workflow = AuthenticatedSecAggPlus(
        num_shares=shares / len(selected),
        reconstruction_threshold=threshold / shares,
        max_weight=settings.max_weight,
        clipping_range=settings.clipping_range,
        quantization_range=settings.quantization_range,
        modulus_range=settings.modulus_range,
        timeout=settings.timeout,
    )
    with _unmasked_total_weight() as total:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            workflow(grid=observed, context=legacy)
    if strategy.average is None:
        return SecureRoundOutcome(None, failures=observed.errors, why="too few shares to unmask")
    change = OrderedDict((n, np.asarray(a, dtype=np.float32)) for n, a in zip(names, strategy.average))
    weight = _signed(total[-1], settings.modulus_range) / settings.quantization_range if total else float("nan")
    contributors = len(strategy.contributors)
    if not 0 < weight <= contributors * (1 + 1e-6):  # each honest weight lies in (0, 1]
        return SecureRoundOutcome(None, failures=observed.errors,
                                  why=f"the aggregate's total weight {weight:.6g} is outside (0, {contributors}]: "
                                      "a node lied about its weight")
    if not all(np.isfinite(a).all() for a in change.values()):
        return SecureRoundOutcome(None, failures=observed.errors, why="the aggregate is not finite")
    return SecureRoundOutcome(change, strategy.contributors, observed.errors)


def _signed(value: int, modulus: int) -> int:
    value = int(value) % modulus
    return value - modulus if value >= modulus // 2 else value


@contextmanager
def _unmasked_total_weight():
    """Flower's workflow keeps the unmasked total weight (the sum of the nodes' quantized
    weight factors) to itself; read it as the workflow extracts it, for the check above."""
    seen: list[int] = []
    original = secaggplus_workflow.factor_extract

    def recording(parameters):
        factor, rest = original(parameters)
        seen.append(int(factor))
        return factor, rest

    secaggplus_workflow.factor_extract = recording
    try:
        yield seen
    finally:
        secaggplus_workflow.factor_extract = original
