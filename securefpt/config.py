"""Experiment configuration: typed, validated at the boundary, loaded from YAML.

Every key a user can set lives in one of these pydantic models; unknown keys and
wrong types are rejected with a one-line error that names the file and the field.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from securefpt.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """The frozen pre-trained language model."""

    name: str = "builtin:minilm"
    max_length: int = Field(128, ge=8, le=4096)
    pooling: Literal["mean", "cls"] = "mean"


class PeftConfig(_Strict):
    """What is trained on top of the frozen model (the rest stays frozen)."""

    method: Literal["prompt_tuning", "p_tuning", "lora", "full"] = "prompt_tuning"
    num_virtual_tokens: int = Field(8, ge=1, le=512)
    prompt_init: Literal["text", "random"] = "text"
    init_text: str = "Predict the category given the following news article"
    encoder_hidden_size: int = Field(128, ge=1)
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    lora_target_modules: Optional[list[str]] = None


class HFDataConfig(_Strict):
    """Fields of a hub dataset for `data.source: hf` (loaded with `datasets`)."""

    path: str
    name: Optional[str] = None
    train_split: str = "train"
    eval_split: str = "validation"
    text_field: str = "text"
    label_field: str = "label"
    language_field: Optional[str] = None


class DataConfig(_Strict):
    """Where each client's private data comes from."""

    source: Literal["demo", "masakhanews_tsv", "hf", "csv", "jsonl"] = "demo"
    root: Optional[Path] = None
    languages: list[str] = Field(default_factory=lambda: ["eng", "fra", "hau", "swa", "yor"])
    train_split: str = "train"
    eval_split: str = "dev"
    max_train_per_client: Optional[int] = Field(None, ge=1)
    max_eval_per_client: Optional[int] = Field(None, ge=1)
    hf: Optional[HFDataConfig] = None

    @model_validator(mode="after")
    def _source_needs(self) -> "DataConfig":
        if self.source in ("masakhanews_tsv", "csv", "jsonl") and self.root is None:
            raise ValueError(f"data.root is required for data.source={self.source}")
        if self.source == "hf" and self.hf is None:
            raise ValueError("data.hf is required for data.source=hf")
        if not self.languages:
            raise ValueError("data.languages must name at least one language")
        if len(set(self.languages)) != len(self.languages):
            raise ValueError("data.languages has duplicates")
        return self


class FLConfig(_Strict):
    """Federated Prompt Averaging (Algorithm 1) and the local training budget."""

    rounds: int = Field(5, ge=1)
    fraction_fit: float = Field(1.0, gt=0.0, le=1.0)
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    patience: Optional[int] = Field(None, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    round_timeout: float = Field(3600.0, gt=0.0)


class DPConfig(_Strict):
    """Differential privacy with Opacus DP-SGD (per client, accounted over the whole run).

    `target_epsilon` is each client's budget for the experiment: the noise multiplier
    is derived from it, unless `noise_multiplier` is fixed, in which case it is only
    the cap beyond which a client declines to train (null: no cap).
    """

    enabled: bool = False
    target_epsilon: Optional[float] = Field(8.0, gt=0.0)
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    noise_multiplier: Optional[float] = Field(None, ge=0.0)
    accountant: Literal["prv", "rdp"] = "prv"


class SecAggConfig(_Strict):
    """Secure aggregation with Flower's SecAgg+ (validated per cohort in secure_aggregation.py)."""

    enabled: bool = True
    num_shares: Optional[int] = None  # None: every selected client holds a share (full graph)
    reconstruction_threshold: Optional[int] = None  # None: a majority of the shares
    clipping_range: float = 1.0  # |weight ratio x update change| must stay inside it
    quantization_range: int = 2**22
    modulus_range: int = 2**32
    max_weight: Optional[float] = None  # public bound on |D_k|; None: data.max_train_per_client, else 1000
    timeout: Optional[float] = None  # per protocol stage; None: fl.round_timeout
    min_cohort: int = 2  # fewest surviving contributors a client accepts in an unmask
    release_eval_metrics: bool = True  # per-language accuracy of the *global* model may leave clients


class ExperimentConfig(_Strict):
    """One experiment: everything `securefpt run` needs."""

    name: str = "experiment"
    model: ModelConfig = ModelConfig()
    peft: PeftConfig = PeftConfig()
    data: DataConfig = DataConfig()
    paradigm: Literal["federated", "monolingual", "centralized"] = "federated"
    fl: FLConfig = FLConfig()
    dp: DPConfig = DPConfig()
    secagg: SecAggConfig = SecAggConfig()
    policy: Optional[Path] = None  # residency policy YAML (policies/)
    clients: Optional[Path] = None  # folder of client manifests (clients/); required with a policy
    server_key: Optional[Path] = None  # Ed25519 key that signs the audit log; None: a new one per run
    seed: int = 0

    @model_validator(mode="after")
    def _dp_supported(self) -> "ExperimentConfig":
        if self.dp.enabled and self.peft.method == "full":
            raise ValueError(
                "dp.enabled with peft.method=full: Opacus cannot compute per-sample gradients for the "
                "PLM's shared position embeddings; use prompt_tuning, p_tuning or lora"
            )
        if self.policy is not None and self.clients is None:
            raise ValueError("clients: a folder of client manifests is required with a policy")
        if self.dp.enabled and self.dp.noise_multiplier is None and self.dp.target_epsilon is None:
            raise ValueError("dp: set dp.target_epsilon or dp.noise_multiplier")
        return self

    def to_json(self) -> str:
        return self.model_dump_json()

    def sha256(self) -> str:
        """Identifies the experiment (audit log, checkpoints, client caches and ledgers)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str) -> "ExperimentConfig":
        return cls.model_validate_json(text)


def first_error(exc: ValidationError) -> str:
    """`dotted.field: message` of a validation error (one line, the first problem)."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
    msg = msg.removeprefix("Value error, ")
    more = len(exc.errors()) - 1
    return f"{loc}: {msg}" + (f" (and {more} more)" if more > 0 else "")


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: malformed YAML{line}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys")
    return loaded


def _parse_value(text: str) -> Any:
    """Parse an override value as YAML (numbers, bools, lists), else keep the string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` overrides to a raw config mapping (a copy)."""
    data = json.loads(json.dumps(raw, default=str))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        node[parts[-1]] = _parse_value(value)
    return data


def load_config(path: Path | str | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load and validate an experiment YAML (or the defaults when `path` is None).

    Relative paths inside the file (data.root, policy) are resolved against the
    file's folder, so a config works from any working directory.
    """
    raw: dict[str, Any] = {}
    where = "defaults"
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        where = str(path)
        raw = read_yaml_mapping(path)
        base = path.resolve().parent
    raw = apply_overrides(raw, overrides or [])
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {first_error(exc)}") from None
    return _resolve_paths(cfg, base)


def _resolve_paths(cfg: ExperimentConfig, base: Path) -> ExperimentConfig:
    updates: dict[str, Any] = {}
    if cfg.data.root is not None and not cfg.data.root.is_absolute():
        updates["data"] = cfg.data.model_copy(update={"root": (base / cfg.data.root).resolve()})
    for key in ("policy", "clients", "server_key"):
        value = getattr(cfg, key)
        if value is not None and not value.is_absolute():
            updates[key] = (base / value).resolve()
    return cfg.model_copy(update=updates) if updates else cfg
