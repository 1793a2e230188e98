"""The operator's experiment file: what `securefpt run` (and `flwr run .`) needs.

Besides what it asks of the nodes (`request()`, protocol/request.py), it names
coordinator-side things: the rounds' cohort, the server optimizer and robust aggregation,
SecAgg+'s settings, the policy, client registry and audit key, and for local trials on one
machine where the trial nodes' data lives. None of this reaches a node except through the
request it builds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, ValidationError, field_validator, model_validator

from securefpt.errors import ConfigError
from securefpt.learning.data_source import DataSource
from securefpt.protocol.request import (
    DPConfig,
    ExperimentRequest,
    ModelConfig,
    PeftConfig,
    PersonalizationConfig,
    PromptTuning,
    Strict,
    TrainingPlan,
    check_distributed,
)
from securefpt.protocol.yaml_files import first_error


class LanguageData(Strict):
    """One language's departure from the experiment's data section (data-efficiency studies)."""

    train_split: Optional[str] = None
    """This language's training split instead of data.train_split."""
    max_train: Optional[int] = Field(None, ge=1)
    """This language's row cap instead of data.max_train_per_client."""


class PartitionConfig(Strict):
    """Clients that are not languages: the languages' data pooled and split across `clients`
    with flwr-datasets, IID or Dirichlet over languages (engines/partitions.py; local trials only)."""

    clients: int = Field(ge=2, le=100)
    """How many clients share the pooled data."""
    scheme: Literal["iid", "dirichlet"] = "iid"
    """iid: equal random shares; dirichlet: language mixes drawn with concentration alpha."""
    alpha: float = Field(0.5, gt=0.0)
    """Dirichlet: smaller is more skewed."""


class DataConfig(DataSource):
    """The task (what every node is asked to train on) and, for local trials, where the data lives.

    `task`, `labels` and the row caps travel to the nodes (in the request). The source
    (`source`, `root`, the splits, `hf`: a DataSource) is read on the operator's machine
    only: the simulation engine turns it into trial nodes' own data bindings
    (securefpt.engines.trial_nodes); a real node binds its data in its own node configuration.
    """

    task: str = "news-topic"
    """The task's name: every node binds its own data to it (node.yaml); it travels in the request."""
    labels: Optional[list[str]] = None
    """The task's label space; None: the union of the trial data's labels."""
    languages: list[str] = Field(default_factory=lambda: ["eng", "fra", "hau", "swa", "yor"])
    """One node per language (or the languages pooled, with partition)."""
    max_train_per_client: Optional[int] = Field(None, ge=1)
    """Cap on each node's training rows (it travels: a node uses at most this many); None: all."""
    max_eval_per_client: Optional[int] = Field(None, ge=1)
    """Cap on each node's evaluation rows; None: all."""
    per_language: dict[str, LanguageData] = Field(default_factory=dict)
    """Local trials: one language's own split or row cap (data-efficiency studies)."""
    partition: Optional[PartitionConfig] = None
    """Local trials: clients that are not languages (IID or Dirichlet splits of the pooled data)."""

    def train_split_of(self, language: str) -> str:
        own = self.per_language.get(language)
        return own.train_split if own is not None and own.train_split else self.train_split

    def max_train_of(self, language: str) -> Optional[int]:
        own = self.per_language.get(language)
        return own.max_train if own is not None and own.max_train else self.max_train_per_client

    def largest_train(self) -> Optional[int]:
        """The most training rows any language may use (None: no cap)."""
        caps = [self.max_train_of(language) for language in self.languages]
        return None if any(cap is None for cap in caps) else max(cap for cap in caps if cap is not None)

    @model_validator(mode="after")
    def _trial_shape(self) -> "DataConfig":
        if not self.languages:
            raise ValueError("data.languages must name at least one language")
        if len(set(self.languages)) != len(self.languages):
            raise ValueError("data.languages has duplicates")
        if self.labels is not None and (len(self.labels) < 2 or len(set(self.labels)) != len(self.labels)):
            raise ValueError("data.labels must name at least 2 distinct labels")
        unknown = sorted(set(self.per_language) - set(self.languages))
        if unknown:
            raise ValueError(f"data.per_language names languages not in data.languages: {unknown}")
        return self


class ServerOptimizerConfig(Strict):
    """How the coordinator moves the global encoder by the round's average change
    (coordinator/server_optimizer.py). `fedavg` with lr 1 is Algorithm 1's plain average."""

    name: Literal["fedavg", "fedavgm", "fedadam", "fedyogi"] = "fedavg"
    """fedavg (Algorithm 1), fedavgm (server momentum), fedadam or fedyogi (adaptive server steps)."""
    lr: float = Field(1.0, gt=0.0)
    """Server learning rate (eta); ~1e-2..1e-1 for fedadam/fedyogi."""
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """Fedavgm."""
    beta_1: float = Field(0.9, ge=0.0, lt=1.0)
    """Fedadam, fedyogi."""
    beta_2: float = Field(0.99, ge=0.0, lt=1.0)
    """Fedadam, fedyogi: the second moment's decay."""
    tau: float = Field(1e-3, gt=0.0)
    """Fedadam, fedyogi: the adaptivity (epsilon of the denominator)."""


class FLConfig(Strict):
    """Federated Prompt Averaging (Algorithm 1) and the local training budget."""

    rounds: int = Field(5, ge=1)
    """Federated rounds (the coordinator's plan; each node refuses rounds outside it)."""
    fraction_fit: float = Field(1.0, gt=0.0, le=1.0)
    """C: the share of willing nodes selected each round (at least one)."""
    local_epochs: int = Field(1, ge=1)
    """Epochs over its own data each selected node trains per round."""
    batch_size: int = Field(16, ge=1)
    """Local batch size (under DP: the expected Poisson batch)."""
    lr: float = Field(5e-3, gt=0.0)
    """Local AdamW learning rate."""
    weight_decay: float = Field(0.0, ge=0.0)
    """Local AdamW weight decay."""
    patience: Optional[int] = Field(None, ge=1)
    """Early stopping: rounds without a better average accuracy before the run stops (the best round's encoder is
    kept); None: off."""
    eval_batch_size: int = Field(64, ge=1)
    """Batch size of evaluation."""
    round_timeout: float = Field(3600.0, gt=0.0)
    """Seconds the coordinator waits for a phase's replies; a node that has not answered by then is a dropout."""
    proximal_mu: float = Field(0.0, ge=0.0)
    """FedProx: each node adds mu/2 ||w - w_global||^2 to its objective."""
    server_optimizer: ServerOptimizerConfig = ServerOptimizerConfig()
    """How the coordinator applies the round's average change."""
    aggregation: Literal["mean", "median", "trimmed_mean"] = "mean"
    """mean: Algorithm 1's weighted mean. median (coordinate-wise) or trimmed_mean (coordinate-wise, dropping
    fl.trim_fraction of the updates at each end): robust to a few poisoning nodes, for plaintext rounds only (under
    SecAgg+ the coordinator sees only the sum); they ignore the nodes' weights."""
    trim_fraction: float = Field(0.2, ge=0.0, lt=0.5)
    """trimmed_mean: the share of updates dropped at each end of every coordinate."""


class SecAggConfig(Strict):
    """Secure aggregation with Flower's SecAgg+. The rules that hold whatever the cohort are these fields'
    bounds; those that depend on the cohort are checked per run (coordinator/secure_aggregation.py)."""

    enabled: bool = True
    """Mask updates with SecAgg+ (a node whose rules require it refuses plaintext rounds)."""
    num_shares: Optional[int] = Field(None, ge=3)
    """An odd number of share holders per node; None: every selected node holds a share (full graph)."""
    reconstruction_threshold: Optional[int] = Field(None, ge=2)
    """None: the smallest count above 2/3 of the shares."""
    clipping_range: float = Field(1.0, gt=0.0)
    """|weight ratio x update change| must stay inside it."""
    quantization_range: int = Field(2**22, ge=2)
    """Integer range updates are quantized into before masking (precision of the sum)."""
    modulus_range: int = Field(2**32, le=2**32)
    """The ring the masked sum lives in: a power of 2 above quantization_range, at most 2**32 (Flower's masks are
    32-bit); it must exceed the cohort times the quantization range."""
    max_weight: Optional[float] = Field(None, gt=0.0)
    """Public bound on |D_k|; None: data.max_train_per_client, else 1000."""
    timeout: Optional[float] = Field(None, gt=0.0)
    """Per protocol stage; None: fl.round_timeout."""
    min_cohort: int = Field(2, ge=2)
    """Fewest surviving contributors the coordinator aggregates."""

    @field_validator("num_shares")
    @classmethod
    def _odd(cls, shares: Optional[int]) -> Optional[int]:
        if shares is not None and shares % 2 == 0:
            raise ValueError(f"must be an odd number >= 3, got {shares}")
        return shares

    @model_validator(mode="after")
    def _ring(self) -> "SecAggConfig":
        if self.modulus_range <= self.quantization_range or self.modulus_range & (self.modulus_range - 1):
            raise ValueError(f"modulus_range must be a power of 2 above quantization_range, got {self.modulus_range}")
        return self


class ExperimentConfig(Strict):
    """One experiment: everything `securefpt run` needs."""

    name: str = "experiment"
    """Names the run directory (runs/<name>-<time>) and the experiment in the audit log."""
    model: ModelConfig = ModelConfig()
    """The frozen language model."""
    peft: PeftConfig = PromptTuning()
    """What is trained on it."""
    data: DataConfig = DataConfig()
    """The task and, for local trials, where each language's data lives."""
    paradigm: Literal["federated", "monolingual", "centralized"] = "federated"
    """federated (Algorithm 1), or the paper's local baselines: monolingual (each language alone) and centralized (all
    data pooled in one place)."""
    fl: FLConfig = FLConfig()
    """Rounds, cohort and each node's local training."""
    personalization: PersonalizationConfig = PersonalizationConfig()
    """What each node keeps for itself."""
    dp: DPConfig = DPConfig()
    """DP-SGD on every node."""
    secagg: SecAggConfig = SecAggConfig()
    """SecAgg+ secure aggregation: the coordinator unmasks only the weighted sum."""
    policy: Optional[Path] = None
    """Residency policy YAML (policies/)"""
    clients: Optional[Path] = None
    """The federation's institutions (clients/<id>/manifest.yaml, node.yaml)"""
    server_key: Optional[Path] = None
    """The coordinator's Ed25519 audit key (private); never in a run directory."""
    tensorboard: bool = False
    """Per-round accuracy, epsilon, bytes to RUN/tensorboard (securefpt[tracking])"""
    seed: int = 0
    """Seeds the model's initialisation, the data order and the coordinator's selection (DP noise always comes from the
    OS)."""

    @model_validator(mode="after")
    def _dp_supported(self) -> "ExperimentConfig":
        if self.dp.enabled and self.peft.method == "full":
            raise ValueError(
                "dp.enabled with peft.method=full: Opacus cannot compute per-sample gradients for the "
                "PLM's shared position embeddings; use prompt_tuning, p_tuning or lora"
            )
        if self.policy is not None and self.clients is None:
            raise ValueError("clients: a folder of client manifests is required with a policy")
        if self.clients is not None and (self.data.partition is not None or self.data.per_language):
            raise ValueError("data.partition and data.per_language shape the operator's own trial data; a "
                             "federation's nodes (clients) bind their own data and their own row caps")
        if self.fl.aggregation != "mean" and self.secagg.enabled:
            raise ValueError(f"fl.aggregation={self.fl.aggregation} needs each node's update: secagg.enabled=false "
                             "(under SecAgg+ the coordinator sees only the sum, so only the mean)")
        if self.dp.enabled and self.dp.noise_multiplier is None and self.dp.target_epsilon is None:
            raise ValueError("dp: set dp.target_epsilon or dp.noise_multiplier")
        check_distributed(self.dp, self.secagg.enabled, self.personalization,
                           planned=self.dp.target_epsilon is None or self.dp.noise_multiplier == 0)
        return self

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> ExperimentConfig:
        return cls.model_validate_json(text)

    def training_plan(self) -> TrainingPlan:
        """The local training every node (and each local baseline) runs: one typed plan."""
        return TrainingPlan(rounds=self.fl.rounds, local_epochs=self.fl.local_epochs, batch_size=self.fl.batch_size,
                            lr=self.fl.lr, weight_decay=self.fl.weight_decay, eval_batch_size=self.fl.eval_batch_size,
                            max_train=self.data.largest_train(), max_eval=self.data.max_eval_per_client,
                            proximal_mu=self.fl.proximal_mu)

    def request(self, labels: list[str]) -> ExperimentRequest:
        """What the nodes are asked: no path, no coordinator-side setting (ConfigError: a request no node
        would accept, e.g. a label space of one label)."""
        try:
            return ExperimentRequest(name=self.name, task=self.data.task, labels=list(labels), model=self.model,
                                     peft=self.peft, training=self.training_plan(), dp=self.dp,
                                     secure_aggregation=self.secagg.enabled, personalization=self.personalization,
                                     seed=self.seed)
        except ValidationError as exc:
            raise ConfigError(f"the request to the nodes: {first_error(exc)}") from None
