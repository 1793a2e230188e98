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
from typing import Optional

import numpy as np
import torch
from torch import nn

from securefpt.errors import ConfigError
from securefpt.learning.backbone import load_backbone, load_tokenizer, tokenize, torch_device
from securefpt.protocol.request import Lora, ModelConfig, PeftConfig, PromptTuning, PTuning, virtual_tokens


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
