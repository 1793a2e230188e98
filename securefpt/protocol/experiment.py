"""The experiment: what an operator writes (ExperimentConfig) and what a node is asked (ExperimentRequest).

`ExperimentConfig` is the coordinator's experiment file. Besides the request it names
coordinator-side things (policy, client registry, audit key, timeouts) and, for local
trials on one machine, where the trial nodes' data lives (`data.source`, `data.root`,
...). None of those paths ever travels: a node receives only `ExperimentRequest`,
which names a task, a label space, a model by name and the training plan, and checks
every field against its own rules (securefpt.node).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ModelConfig(Strict):
    """The frozen pre-trained language model, by name: each node maps the name to its own copy."""

    name: str = "builtin:multilingual-e5-small"
    """builtin:multilingual-e5-small (the default: 4-bit origin, dequantized), builtin:minilm (English), builtin:tiny
    (tests), a local folder or a cached hub id. Each node maps the name to its own copy."""
    max_length: int = Field(128, ge=8, le=4096)
    """Tokens per input, virtual tokens included."""
    pooling: Literal["mean", "cls"] = "mean"
    """How the hidden states become one vector for the head: their mean (E5 was trained so) or the first token's."""
    input_prefix: str = Field("", max_length=64)
    """Put before every text (E5 was trained with "query: ")"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Auto: a CUDA GPU where there is one (bf16 autocast)"""


class PeftConfig(Strict):
    """What is trained on top of the frozen model (the rest stays frozen)."""

    method: Literal["prompt_tuning", "p_tuning", "lora", "full"] = "prompt_tuning"
    """prompt_tuning (the paper's), p_tuning (an MLP prompt encoder), lora, or full fine-tuning (no DP)."""
    num_virtual_tokens: int = Field(8, ge=1, le=512)
    """Length of the trained soft prompt (prompt_tuning, p_tuning)."""
    prompt_init: Literal["text", "random"] = "text"
    """text: the prompt starts as the embedding of init_text (PEFT's TEXT init); random otherwise."""
    init_text: str = "Predict the category given the following news article"
    """The text whose token embeddings start the prompt (prompt_init: text)."""
    encoder_hidden_size: int = Field(128, ge=1)
    """Hidden size of p_tuning's prompt-encoder MLP."""
    lora_r: int = Field(8, ge=1)
    """LoRA rank."""
    lora_alpha: int = Field(16, ge=1)
    """LoRA scaling (alpha / r)."""
    lora_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout on LoRA's input."""
    lora_target_modules: Optional[list[str]] = None
    """Module names LoRA adapts; None: the attention projections of the backbone."""


class HFDataConfig(Strict):
    """A dataset read with `datasets` for `data.source: hf`: a hub id (cached, or downloaded where
    SECUREFPT_ALLOW_DOWNLOAD=1), a builder with local `data_files` in hub formats (`path: json`,
    `csv`, `parquet`), or a folder written by `save_to_disk` (`from_disk: true`)."""

    path: str
    """"{lang}" is replaced by the language (one save_to_disk folder per language)"""
    name: Optional[str] = None
    """A config name; "{lang}" is replaced by the language."""
    data_files: Optional[dict[str, Union[str, list[str]]]] = None
    """Split -> file(s), for a builder."""
    from_disk: bool = False
    """path is a folder written by save_to_disk."""
    train_split: str = "train"
    """The training split's name."""
    eval_split: str = "validation"
    """The evaluation split's name."""
    text_field: Union[str, list[str]] = "text"
    """Several fields (a title and a body) are joined with ". "."""
    pair_field: Optional[str] = None
    """The second text of a sentence pair (XNLI: premise / hypothesis)"""
    label_field: str = "label"
    """The field that holds the label."""
    language_field: Optional[str] = None
    """A field that names each row's language (one dataset for all languages); None: one dataset per language."""


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


class DataConfig(Strict):
    """The task (what every node is asked to train on) and, for local trials, where the data lives.

    `task` and `labels` travel to the nodes. `source`, `root`, the splits and `hf` are
    read on the operator's machine only: the simulation engine turns them into trial
    nodes' own data bindings (securefpt.engines.trial_nodes); a real node binds its data
    in its own node configuration.
    """

    task: str = "news-topic"
    """The task's name: every node binds its own data to it (node.yaml); it travels in the request."""
    labels: Optional[list[str]] = None
    """The task's label space; None: the union of the trial data's labels."""
    source: Literal["demo", "masakhanews_tsv", "hf", "csv", "jsonl"] = "demo"
    """Local trials: where the trial nodes' data is read (demo: the packaged demo data)."""
    root: Optional[Path] = None
    """Local trials: the folder of masakhanews_tsv, csv or jsonl data (one folder per language)."""
    languages: list[str] = Field(default_factory=lambda: ["eng", "fra", "hau", "swa", "yor"])
    """One node per language (or the languages pooled, with partition)."""
    train_split: str = "train"
    """Local trials: the split each node trains on (MasakhaNEWS protocol: test)."""
    eval_split: str = "dev"
    """Local trials: the split each node evaluates on."""
    max_train_per_client: Optional[int] = Field(None, ge=1)
    """Cap on each node's training rows (it travels: a node uses at most this many); None: all."""
    max_eval_per_client: Optional[int] = Field(None, ge=1)
    """Cap on each node's evaluation rows; None: all."""
    hf: Optional[HFDataConfig] = None
    """data.source: hf: the dataset and its fields."""
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
        return None if None in caps else max(caps)

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


class PersonalizationConfig(Strict):
    """What each node keeps and does for itself (node/personal.py): nothing of it leaves the node.

    `local_head`: the classification head is the node's own and never sent; only the
    prompt encoder is aggregated (FedPer). `adapt_epochs`: after the last round each
    node tunes the final global encoder (and its head) on its own data and keeps the
    result as its personalized model."""

    local_head: bool = False
    """FedPer: each node's head is its own and never sent; only the prompt encoder is aggregated."""
    adapt_epochs: int = Field(0, ge=0, le=100)
    """Epochs each node tunes the final encoder on its own data after the last round (kept on the node)."""
    adapt_lr: Optional[float] = Field(None, gt=0.0)
    """None: fl.lr."""

    @property
    def planned(self) -> bool:
        """Whether nodes end the run with a model of their own (the `personalize` query)."""
        return self.adapt_epochs > 0 or self.local_head

    def travels(self, name: str) -> bool:
        """Whether a trainable parameter is aggregated (sent by the nodes); a local head is not."""
        return not (self.local_head and name.startswith("head."))


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


class DPConfig(Strict):
    """Differential privacy, accounted on each node over the whole run (and the dataset's lifetime).

    `target_epsilon` is each node's budget for the experiment: the noise multiplier
    is derived from it, unless `noise_multiplier` is fixed, in which case it is only
    the cap beyond which a node declines to train (null: no cap).
    """

    enabled: bool = False
    """Train with differential privacy on every node (each node's own rules may require it)."""
    mode: Literal["local", "distributed"] = "local"
    """local: each node runs Opacus DP-SGD and adds all the noise its own update needs (safe whatever the others do).
    distributed: DP-FedSGD under SecAgg+; each node adds only its share of the noise of the sum (Skellam, on the
    integer grid), so the unmasked sum carries what a trusted server would add: far less noise for the same epsilon,
    assuming at least the reconstruction threshold of contributors add theirs. Needs secagg and a shared head; the
    sum's dp.noise_multiplier is public (fixed, or planned before the run from target_epsilon at the row cap);
    fl.batch_size is the public normaliser and the expected Poisson batch of a node at the row cap (with a cap every
    node samples each row at the same public rate batch/cap, so no epsilon or refusal depends on its size),
    fl.local_epochs is unused (one noisy gradient a round), server_optimizer.lr is the step."""
    target_epsilon: Optional[float] = Field(8.0, gt=0.0)
    """Each node's epsilon for the whole experiment (the noise is derived from it), or with noise_multiplier fixed the
    cap beyond which a node declines to train."""
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    """The delta of (epsilon, delta)-DP; well below 1 / rows."""
    max_grad_norm: float = Field(1.0, gt=0.0)
    """Per-example gradient clipping norm C."""
    noise_multiplier: Optional[float] = Field(None, ge=0.0)
    """Fix sigma instead of deriving it from target_epsilon."""
    accountant: Literal["prv", "rdp"] = "prv"
    """Opacus accountant: prv (tighter) or rdp."""

    @property
    def distributed(self) -> bool:
        """DP on, in distributed mode (each node adds only its share of the sum's noise)."""
        return self.enabled and self.mode == "distributed"


class SecAggConfig(Strict):
    """Secure aggregation with Flower's SecAgg+ (validated per cohort in coordinator/secure_aggregation.py)."""

    enabled: bool = True
    """Mask updates with SecAgg+ (a node whose rules require it refuses plaintext rounds)."""
    num_shares: Optional[int] = None
    """None: every selected node holds a share (full graph)"""
    reconstruction_threshold: Optional[int] = None
    """None: the smallest count above 2/3 of the shares."""
    clipping_range: float = 1.0
    """|weight ratio x update change| must stay inside it."""
    quantization_range: int = 2**22
    """Integer range updates are quantized into before masking (precision of the sum)."""
    modulus_range: int = 2**32
    """The ring the masked sum lives in; must exceed the cohort times the quantization range."""
    max_weight: Optional[float] = None
    """Public bound on |D_k|; None: data.max_train_per_client, else 1000."""
    timeout: Optional[float] = None
    """Per protocol stage; None: fl.round_timeout."""
    min_cohort: int = 2
    """Fewest surviving contributors the coordinator aggregates."""


def _check_distributed(dp: DPConfig, secure: bool, personalization: PersonalizationConfig,
                       planned: bool = True) -> None:
    """What distributed DP needs, checked by the operator's config and again by each node's request
    (`planned`: the noise multiplier must be set; the operator's config may leave it to be planned
    from dp.target_epsilon, engines/dp_planning.py)."""
    if not dp.distributed:
        return
    why = ("secagg.enabled=false (the noise of the sum needs the sum to be all the coordinator sees)"
           if not secure else
           "no dp.noise_multiplier (the sum's noise multiplier is public: every node sizes its share from it)"
           if planned and (dp.noise_multiplier is None or dp.noise_multiplier <= 0) else
           "personalization.local_head=true (the head would train outside the noisy gradient)"
           if personalization.local_head else "")
    if why:
        raise ValueError(f"dp.mode=distributed with {why}")


class ExperimentConfig(Strict):
    """One experiment: everything `securefpt run` needs."""

    name: str = "experiment"
    """Names the run directory (runs/<name>-<time>) and the experiment in the audit log."""
    model: ModelConfig = ModelConfig()
    """The frozen language model."""
    peft: PeftConfig = PeftConfig()
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
        _check_distributed(self.dp, self.secagg.enabled, self.personalization,
                           planned=self.dp.target_epsilon is None or self.dp.noise_multiplier == 0)
        return self

    def to_json(self) -> str:
        return self.model_dump_json()

    def sha256(self) -> str:
        """Identifies the experiment (audit log, checkpoints)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str) -> "ExperimentConfig":
        return cls.model_validate_json(text)

    def request(self, labels: list[str]) -> "ExperimentRequest":
        """What the nodes are asked: no path, no coordinator-side setting."""
        plan = TrainingPlan(rounds=self.fl.rounds, local_epochs=self.fl.local_epochs, batch_size=self.fl.batch_size,
                            lr=self.fl.lr, weight_decay=self.fl.weight_decay, eval_batch_size=self.fl.eval_batch_size,
                            max_train=self.data.largest_train(), max_eval=self.data.max_eval_per_client,
                            proximal_mu=self.fl.proximal_mu)
        return ExperimentRequest(name=self.name, task=self.data.task, labels=list(labels), model=self.model,
                                 peft=self.peft, training=plan, dp=self.dp, secure_aggregation=self.secagg.enabled,
                                 personalization=self.personalization, seed=self.seed)


class TrainingPlan(Strict):
    """The local training a node is asked for (it may use less data than asked, never more)."""

    rounds: int = Field(ge=1)
    local_epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0.0)
    weight_decay: float = Field(ge=0.0)
    eval_batch_size: int = Field(ge=1)
    max_train: Optional[int] = Field(None, ge=1)
    max_eval: Optional[int] = Field(None, ge=1)
    proximal_mu: float = Field(0.0, ge=0.0)


class ExperimentRequest(Strict):
    """The part of an experiment that reaches a node: every field is checked there against its own rules."""

    name: str = Field(max_length=200)
    task: str = Field(max_length=200)
    labels: list[str]
    model: ModelConfig
    peft: PeftConfig
    training: TrainingPlan
    dp: DPConfig
    secure_aggregation: bool
    personalization: PersonalizationConfig = PersonalizationConfig()
    seed: int

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: list[str]) -> list[str]:
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError("at least 2 distinct labels")
        return labels

    @model_validator(mode="after")
    def _distributed(self) -> "ExperimentRequest":
        _check_distributed(self.dp, self.secure_aggregation, self.personalization)
        return self

    def to_json(self) -> str:
        return self.model_dump_json()

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str) -> "ExperimentRequest":
        return cls.model_validate_json(text)
