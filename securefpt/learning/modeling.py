"""Assemble a classifier from a frozen PLM and a PEFT config; move only trainable parts.

The model is always built from `ModelConfig` + `PeftConfig`. The frozen backbone is
loaded with the real Hugging Face loading code; the prompt encoders are PEFT's own
modules (`PromptEmbedding` for prompt tuning, `PromptEncoder` for P-tuning) and LoRA
is injected with PEFT. Only parameters with `requires_grad` are ever extracted, sent,
aggregated or saved, by name and in registration order.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from securefpt.errors import ConfigError, ModelUnavailableError
from securefpt.learning.builtin_models import BUILTIN_E5, BUILTIN_MINILM, BUILTIN_TINY, resolve
from securefpt.offline import hf_offline_kwargs
from securefpt.protocol.request import Lora, ModelConfig, PeftConfig, PromptTuning, PTuning, virtual_tokens


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer, loaded once per process (a 250k-piece vocabulary costs seconds and
    hundreds of MB; every call tokenizes with explicit truncation and padding, so sharing is safe)."""
    return _tokenizer(resolve(cfg.name), cfg.name)


@lru_cache(maxsize=4)
def _tokenizer(source: str, name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, **hf_offline_kwargs())
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(_unavailable(name, exc)) from None


def _unavailable(name: str, exc: Exception) -> str:
    return (
        f"model.name={name}: cannot load it offline ({type(exc).__name__}). Use "
        f"'{BUILTIN_E5}' (multilingual), '{BUILTIN_MINILM}' (English), a local folder with config.json "
        "and weights, or a hub id already in the local Hugging Face cache (SECUREFPT_ALLOW_DOWNLOAD=1 allows "
        "downloads)."
    )


def load_backbone(cfg: ModelConfig, vocab_size: int, seed: int) -> nn.Module:
    """The frozen encoder: a packaged model, a tiny random BERT, or any HF model (its safetensors weights
    memory-mapped, so the processes of one machine share one copy of the pages)."""
    from transformers import AutoModel, BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    if cfg.name == BUILTIN_TINY:
        torch.manual_seed(seed)
        tiny = BertConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=max(cfg.max_length, 64),
            hidden_dropout_prob=0.0,  # deterministic: tests compare against hand-computed gradients
            attention_probs_dropout_prob=0.0,
        )
        return BertModel(tiny, add_pooling_layer=False)
    source = resolve(cfg.name)
    try:
        backbone = AutoModel.from_pretrained(source, **hf_offline_kwargs())
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(_unavailable(cfg.name, exc)) from None
    share_weights(backbone, source)
    return backbone


def share_weights(backbone: nn.Module, folder: str) -> None:
    """Back the backbone's parameters by a private (copy-on-write) memory map of the folder's
    `model.safetensors`: every process that loads the same file shares its pages, and a write (full
    fine-tuning) copies a page instead of touching the file. A model saved otherwise is left as loaded."""
    from securefpt.learning.artifacts import mapped_safetensors

    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        return
    mapped = mapped_safetensors(path)
    current = backbone.state_dict()
    usable = {k: v for k, v in mapped.items() if k in current and current[k].shape == v.shape
              and current[k].dtype == v.dtype}
    if usable:
        backbone.load_state_dict(usable, strict=False, assign=True)


def torch_device(choice: str) -> torch.device:
    """`model.device`: auto picks a CUDA GPU where there is one; cuda without one is a config error."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device=cuda: this machine has no CUDA GPU that torch can use "
                          "(torch.cuda.is_available() is False); use model.device=auto or cpu")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


class PromptClassifier(nn.Module):
    """Frozen encoder with optional virtual-token prompt and a linear head.

    Virtual token embeddings are prepended to the word embeddings (as in PEFT's
    prompt tuning), the encoder runs on `inputs_embeds`, and the pooled output goes to
    the head.
    """

    def __init__(
        self,
        backbone: nn.Module,
        prompt_encoder: Optional[nn.Module],
        num_virtual_tokens: int,
        num_labels: int,
        pooling: str,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.prompt_encoder = prompt_encoder
        self.num_virtual_tokens = num_virtual_tokens if prompt_encoder is not None else 0
        self.pooling = pooling
        self.head = nn.Linear(backbone.config.hidden_size, num_labels)
        self.register_buffer("prompt_ids", torch.arange(self.num_virtual_tokens), persistent=False)
        self.autocast_dtype: Optional[torch.dtype] = None  # mixed precision on a GPU that has it

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        device = self.head.weight.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        if self.autocast_dtype is None:
            return self._forward(input_ids, attention_mask)
        with torch.autocast(device.type, dtype=self.autocast_dtype):
            return self._forward(input_ids, attention_mask).float()

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        embeds = self.backbone.get_input_embeddings()(input_ids)
        if self.prompt_encoder is not None:
            batch = input_ids.shape[0]
            prompts = self.prompt_encoder(self.prompt_ids.unsqueeze(0).expand(batch, -1))
            embeds = torch.cat([prompts.to(embeds.dtype), embeds], dim=1)
            ones = attention_mask.new_ones(batch, self.num_virtual_tokens)
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        hidden = self.backbone(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, self.num_virtual_tokens]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled)


def _prompt_encoder(peft_cfg: PromptTuning | PTuning, backbone: nn.Module, tokenizer) -> nn.Module:
    from peft import PromptEncoder, PromptEncoderConfig, PromptTuningConfig
    from peft.tuners.prompt_tuning.model import PromptEmbedding

    dim = backbone.config.hidden_size
    common = dict(
        task_type="SEQ_CLS",
        num_virtual_tokens=peft_cfg.num_virtual_tokens,
        token_dim=dim,
        num_transformer_submodules=1,
        num_attention_heads=backbone.config.num_attention_heads,
        num_layers=backbone.config.num_hidden_layers,
    )
    if isinstance(peft_cfg, PromptTuning):
        prompt = PromptEmbedding(PromptTuningConfig(**common, prompt_tuning_init="RANDOM"),
                                 backbone.get_input_embeddings())
        if peft_cfg.prompt_init == "text" and tokenizer is not None:  # (None: counting parameters only)
            _init_from_text(prompt, backbone, tokenizer, peft_cfg)
        return prompt
    cfg = PromptEncoderConfig(
        **common,
        encoder_reparameterization_type="MLP",
        encoder_hidden_size=peft_cfg.encoder_hidden_size,
    )
    return PromptEncoder(cfg)


def _init_from_text(prompt: nn.Module, backbone: nn.Module, tokenizer, peft_cfg: PromptTuning) -> None:
    """PEFT's TEXT initialisation (the init text's token embeddings, repeated or cut to the number of
    virtual tokens), with the tokenizer already loaded rather than PEFT loading it again by path."""
    ids = tokenizer(peft_cfg.init_text)["input_ids"]
    n = peft_cfg.num_virtual_tokens
    ids = (ids * (n // max(len(ids), 1) + 1))[:n]
    with torch.no_grad():
        words = backbone.get_input_embeddings()(torch.tensor(ids, dtype=torch.long))
        prompt.embedding.weight.copy_(words.detach().to(prompt.embedding.weight.dtype))


def tokenize(tokenizer, texts: list[str], pairs: Optional[list[Optional[str]]], max_length: int,
             padding: str | bool = True) -> dict:
    """Token ids and attention mask of texts, or of sentence pairs tokenized as pairs (the
    model's own pair template, e.g. `[CLS] a [SEP] b [SEP]`, truncating the longer first)."""
    if pairs is not None and any(p is not None for p in pairs):
        if any(p is None for p in pairs):
            raise ValueError("a batch mixes single texts and sentence pairs")
        return tokenizer(list(texts), list(pairs), truncation="longest_first", max_length=max_length,
                         padding=padding, return_tensors="pt")
    return tokenizer(list(texts), truncation=True, max_length=max_length, padding=padding, return_tensors="pt")


@dataclass
class AssembledModel:
    model: PromptClassifier
    tokenizer: object
    max_text_tokens: int
    input_prefix: str = ""

    def trainable_names(self) -> list[str]:
        return trainable_names(self.model)

    def encode(self, examples, padding: str | bool = True) -> dict:
        """Tokenize examples (`.text`, `.pair`) within the room the virtual tokens leave."""
        return tokenize(self.tokenizer, [self.input_prefix + ex.text for ex in examples], [ex.pair for ex in examples],
                        self.max_text_tokens, padding)


def build_model(
    model_cfg: ModelConfig, peft_cfg: PeftConfig, num_labels: int, seed: int
) -> AssembledModel:
    """Build the classifier described by the configs; identical for every party given `seed`."""
    if num_labels < 2:
        raise ConfigError(f"need at least 2 labels to classify, got {num_labels}")
    tokenizer = load_tokenizer(model_cfg)
    backbone = load_backbone(model_cfg, len(tokenizer), seed)
    torch.manual_seed(seed)
    model = assemble(backbone, peft_cfg, num_labels, model_cfg.pooling, tokenizer)
    max_positions = getattr(backbone.config, "max_position_embeddings", model_cfg.max_length)
    # XLM-R style models reserve position ids for padding; keep two spare positions.
    total = min(model_cfg.max_length, max_positions - 2)
    max_text = total - model.num_virtual_tokens
    if max_text < 4:
        raise ConfigError(
            f"model.max_length={model_cfg.max_length} leaves no room for text after "
            f"{model.num_virtual_tokens} virtual tokens"
        )
    device = torch_device(model_cfg.device)
    model.to(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        model.autocast_dtype = torch.bfloat16
    model.train()
    return AssembledModel(model=model, tokenizer=tokenizer, max_text_tokens=max_text,
                          input_prefix=model_cfg.input_prefix)


def assemble(backbone: nn.Module, peft_cfg: PeftConfig, num_labels: int, pooling: str,
             tokenizer=None) -> PromptClassifier:
    """The classifier over a frozen `backbone` with what `peft_cfg` trains (and only that trainable)."""
    for p in backbone.parameters():
        p.requires_grad_(peft_cfg.method == "full")
    prompt = None
    if isinstance(peft_cfg, (PromptTuning, PTuning)):
        prompt = _prompt_encoder(peft_cfg, backbone, tokenizer)
    elif isinstance(peft_cfg, Lora):
        backbone = _inject_lora(backbone, peft_cfg)
    return PromptClassifier(backbone, prompt, virtual_tokens(peft_cfg), num_labels, pooling)


def lora_targets(backbone: nn.Module, peft_cfg: Lora) -> list[str]:
    """The modules LoRA adapts: as configured, else the attention query and value of BERT-like models."""
    targets = peft_cfg.lora_target_modules
    if targets is None and getattr(backbone.config, "model_type", "") in ("bert", "xlm-roberta", "roberta"):
        targets = ["query", "value"]
    if targets is None:
        raise ConfigError("peft.lora_target_modules: required for this model type")
    return targets


def _inject_lora(backbone: nn.Module, peft_cfg: Lora) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    kwargs = dict(r=peft_cfg.lora_r, lora_alpha=peft_cfg.lora_alpha, lora_dropout=peft_cfg.lora_dropout)
    backbone = inject_adapter_in_model(LoraConfig(target_modules=lora_targets(backbone, peft_cfg), **kwargs), backbone)
    for name, p in backbone.named_parameters():
        p.requires_grad_("lora_" in name)
    return backbone


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def get_trainable(model: nn.Module) -> "OrderedDict[str, np.ndarray]":
    """Trainable parameters as float32 arrays, in registration order."""
    return OrderedDict(
        (n, p.detach().cpu().numpy().astype(np.float32, copy=True))
        for n, p in model.named_parameters()
        if p.requires_grad
    )


def set_trainable(model: nn.Module, arrays: "dict[str, np.ndarray]") -> None:
    """Load exactly the trainable parameters; any missing, extra or misshaped one is an error."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(arrays):
        missing = sorted(set(params) - set(arrays))[:3]
        extra = sorted(set(arrays) - set(params))[:3]
        raise ValueError(f"trainable parameters do not match (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for name, p in params.items():
            value = torch.as_tensor(np.asarray(arrays[name]), dtype=p.dtype)
            if value.shape != p.shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(p.shape)}")
            p.copy_(value)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
