"""The request: what a node is asked to do, the only part of an experiment that travels.

`ExperimentRequest` names a task, a label space, a model by name, what is trained on it
(one typed config per PEFT method, as PEFT itself does), the local training plan, DP and
what each node keeps for itself. It carries no path and no coordinator-side setting: the
operator's experiment file (securefpt/experiment/) builds it, the setup message carries it
as JSON, and every node validates it here and checks every field against its own rules
(securefpt/node/guards.py).
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal, Optional, Union, cast

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, field_validator, model_validator

from securefpt.protocol.attestation import canonical


class Strict(BaseModel):
    """A schema that refuses unknown keys and cannot be changed once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    def sha256(self) -> str:
        """Identifies the validated object: SHA-256 of its canonical JSON (sorted keys, no whitespace),
        the one recipe for experiments, requests and the audit log's entries."""
        return hashlib.sha256(canonical(self.model_dump(mode="json"))).hexdigest()


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


class PromptTuning(Strict):
    """PEFT's prompt tuning (the paper's method): a trained soft prompt of virtual tokens before the input."""

    method: Literal["prompt_tuning"] = "prompt_tuning"
    """The method (the default where a section names none)."""
    num_virtual_tokens: int = Field(8, ge=1, le=512)
    """Length of the trained soft prompt."""
    prompt_init: Literal["text", "random"] = "text"
    """text: the prompt starts as the embedding of init_text (PEFT's TEXT init); random otherwise."""
    init_text: str = "Predict the category given the following news article"
    """The text whose token embeddings start the prompt (prompt_init: text)."""


class PTuning(Strict):
    """P-tuning: the virtual tokens come out of a trained MLP prompt encoder."""

    method: Literal["p_tuning"]
    """The method."""
    num_virtual_tokens: int = Field(8, ge=1, le=512)
    """Length of the soft prompt."""
    encoder_hidden_size: int = Field(128, ge=1)
    """Hidden size of the prompt-encoder MLP."""


class Lora(Strict):
    """LoRA: trained low-rank updates of the backbone's attention projections."""

    method: Literal["lora"]
    """The method."""
    lora_r: int = Field(8, ge=1)
    """LoRA rank."""
    lora_alpha: int = Field(16, ge=1)
    """LoRA scaling (alpha / r)."""
    lora_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout on LoRA's input."""
    lora_target_modules: Optional[list[str]] = None
    """Module names LoRA adapts; None: the attention projections of the backbone."""


class FullFineTuning(Strict):
    """Every parameter of the backbone trains (the paper's non-parameter-efficient baseline; no DP)."""

    method: Literal["full"]
    """The method."""


def _method(value) -> str:
    """The tag of a PEFT section: its `method`, prompt tuning where it names none."""
    found = value.get("method") if isinstance(value, dict) else getattr(value, "method", None)
    return found or "prompt_tuning"


PeftConfig = Annotated[
    Union[Annotated[PromptTuning, Tag("prompt_tuning")], Annotated[PTuning, Tag("p_tuning")],
          Annotated[Lora, Tag("lora")], Annotated[FullFineTuning, Tag("full")]],
    Discriminator(_method),
]
"""What is trained on top of the frozen model (the rest stays frozen): one config per method."""

PEFT_CLASSES: dict[str, type[Strict]] = {"prompt_tuning": PromptTuning, "p_tuning": PTuning, "lora": Lora,
                                          "full": FullFineTuning}
PEFT_METHODS = tuple(PEFT_CLASSES)
_PEFT: TypeAdapter[PeftConfig] = TypeAdapter(cast(Any, PeftConfig))  # (a tagged union, not a class)


def parse_peft(**settings) -> PeftConfig:
    """The PEFT config `settings` describe (`method` picks the type; prompt tuning without one)."""
    return _PEFT.validate_python(settings)


def with_method(peft: PeftConfig, method: str, **settings) -> PeftConfig:
    """`peft` switched to `method`: the settings that method has are kept (a prompt length from prompt
    tuning to p-tuning), the others dropped; `settings` it has are applied on top."""
    fields = PEFT_CLASSES[method].model_fields
    kept = {k: v for k, v in {**peft.model_dump(), **settings}.items() if k in fields}
    return parse_peft(**{**kept, "method": method})


def virtual_tokens(peft: PeftConfig) -> int:
    """Virtual tokens the method puts before every input (0 for LoRA and full fine-tuning)."""
    return peft.num_virtual_tokens if isinstance(peft, (PromptTuning, PTuning)) else 0


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


DPMode = Literal["local", "distributed"]
DP_MODES: tuple[DPMode, ...] = ("local", "distributed")


class DPConfig(Strict):
    """Differential privacy, accounted on each node over the whole run (and the dataset's lifetime).

    `target_epsilon` is each node's budget for the experiment: the noise multiplier
    is derived from it, unless `noise_multiplier` is fixed, in which case it is only
    the cap beyond which a node declines to train (null: no cap).
    """

    enabled: bool = False
    """Train with differential privacy on every node (each node's own rules may require it)."""
    mode: DPMode = "local"
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


def check_distributed(dp: DPConfig, secure: bool, personalization: PersonalizationConfig,
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


REQUEST_FILE = "request.json"  # a run directory's copy of the request, and each node's own copy of what it trained


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
        check_distributed(self.dp, self.secure_aggregation, self.personalization)
        return self

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> "ExperimentRequest":
        return cls.model_validate_json(text)
