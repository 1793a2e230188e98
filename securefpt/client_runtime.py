"""A client's local state: its private data and its copy of the model, built once per process.

Flower's simulation engine reuses actor processes across rounds; building MiniLM and
re-reading data every round would dominate the round time, so runtimes are cached per
(experiment, language). The cache holds no global parameters between rounds: every
round starts from the encoder the server sent.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

from securefpt.config import ExperimentConfig
from securefpt.data import ClientData, load_client_data
from securefpt.modeling import AssembledModel, build_model, get_trainable, set_trainable
from securefpt.training import EvalResult, TrainResult, evaluate, train_local


class ClientRuntime:
    def __init__(self, cfg: ExperimentConfig, language: str, labels: list[str]) -> None:
        self.cfg = cfg
        self.language = language
        self.data: ClientData = load_client_data(cfg.data, language, labels, cfg.seed)
        self.assembled: AssembledModel = build_model(cfg.model, cfg.peft, len(labels), cfg.seed)

    def fit(self, global_arrays, server_round: int, seed_offset: int = 0) -> tuple[dict, TrainResult]:
        """Start from the global encoder, train locally, return the new trainable parameters."""
        set_trainable(self.assembled.model, global_arrays)
        seed = self.cfg.seed * 100_003 + server_round * 1_009 + seed_offset
        result = train_local(self.assembled, self.data.train, self.cfg.fl, seed)
        return get_trainable(self.assembled.model), result

    def evaluate(self, arrays) -> EvalResult:
        set_trainable(self.assembled.model, arrays)
        return evaluate(self.assembled, self.data.eval, self.cfg.fl.eval_batch_size)


def config_key(cfg: ExperimentConfig) -> str:
    return hashlib.sha256(cfg.to_json().encode()).hexdigest()


@lru_cache(maxsize=8)
def _cached(key: str, cfg_json: str, language: str, labels: tuple[str, ...]) -> ClientRuntime:
    return ClientRuntime(ExperimentConfig.from_json(cfg_json), language, list(labels))


def get_runtime(cfg: ExperimentConfig, language: str, labels: list[str]) -> ClientRuntime:
    return _cached(config_key(cfg), cfg.to_json(), language, tuple(labels))
