"""A client's local state: its private data and its copy of the model, built once per process.

Flower's simulation engine reuses actor processes across rounds; building MiniLM and
re-reading data every round would dominate the round time, so runtimes are cached per
(experiment, language). The cache holds no global parameters between rounds: every
round starts from the encoder the server sent.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

from securefpt.config import ExperimentConfig
from securefpt.data import ClientData, load_client_data
from securefpt.modeling import AssembledModel, build_model, get_trainable, set_trainable
from securefpt.privacy import PrivacyLedger, PrivacyPlan, dp_train, plan_privacy
from securefpt.training import EvalResult, TrainResult, evaluate, train_local


class ClientRuntime:
    def __init__(self, cfg: ExperimentConfig, language: str, labels: list[str]) -> None:
        self.cfg = cfg
        self.language = language
        self.data: ClientData = load_client_data(cfg.data, language, labels, cfg.seed)
        self.assembled: AssembledModel = build_model(cfg.model, cfg.peft, len(labels), cfg.seed)
        self._plan: Optional[PrivacyPlan] = None

    @property
    def privacy_plan(self) -> Optional[PrivacyPlan]:
        """This client's DP plan for the run (None without DP); |D_k| never leaves the client."""
        if not self.cfg.dp.enabled:
            return None
        if self._plan is None:
            self._plan = plan_privacy(self.cfg, len(self.data.train))
        return self._plan

    def fit(self, global_arrays, server_round: int, seed_offset: int = 0,
            ledger: Optional[PrivacyLedger] = None) -> tuple[dict, TrainResult]:
        """Start from the global encoder, train locally (DP-SGD when configured, spending
        from `ledger`), return the new trainable parameters."""
        set_trainable(self.assembled.model, global_arrays)
        seed = self.cfg.seed * 100_003 + server_round * 1_009 + seed_offset
        plan = self.privacy_plan
        if plan is None:
            result = train_local(self.assembled, self.data.train, self.cfg.fl, seed)
        else:
            result = dp_train(self.assembled, self.data.train, self.cfg, plan, seed)
            if ledger is not None:
                ledger.spend(plan, result.steps)
        return get_trainable(self.assembled.model), result

    def evaluate(self, arrays) -> EvalResult:
        set_trainable(self.assembled.model, arrays)
        return evaluate(self.assembled, self.data.eval, self.cfg.fl.eval_batch_size)


@lru_cache(maxsize=8)
def _cached(key: str, cfg_json: str, language: str, labels: tuple[str, ...]) -> ClientRuntime:
    return ClientRuntime(ExperimentConfig.from_json(cfg_json), language, list(labels))


def get_runtime(cfg: ExperimentConfig, language: str, labels: list[str]) -> ClientRuntime:
    return _cached(cfg.sha256(), cfg.to_json(), language, tuple(labels))
