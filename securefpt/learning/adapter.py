"""A run's result in the formats its users know: a standard PEFT adapter and the head beside it.

`save_classifier` writes, into a folder:
- `adapter_config.json` + `adapter_model.safetensors`: the prompt encoder (or the LoRA
  matrices) as a PEFT adapter for the frozen base model, loadable with
  `PeftModel.from_pretrained(base, folder)` (task FEATURE_EXTRACTION: the hidden states
  with the virtual tokens in front);
- `classifier_head.safetensors` + `classifier.json`: the linear head over the pooled
  hidden states, with the label names, the pooling and the number of virtual tokens.
`load_classifier` (securefpt/learning/classifier.py) assembles both again.
Full fine-tuning has no adapter: its folder holds the head and securefpt's own
`prompt_encoder.safetensors` only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from securefpt.learning.artifacts import save_arrays
from securefpt.learning.backbone import load_backbone, load_tokenizer
from securefpt.learning.modeling import lora_targets
from securefpt.protocol.request import Lora, ModelConfig, PeftConfig, PromptTuning, PTuning, virtual_tokens

HEAD_FILE, CLASSIFIER_FILE = "classifier_head.safetensors", "classifier.json"


def peft_config(model_cfg: ModelConfig, peft_cfg: PeftConfig, backbone):
    """The PEFT config that describes this run's trainable part on `backbone` (None for `full`)."""
    from peft import LoraConfig, PromptEncoderConfig, PromptTuningConfig

    common = dict(task_type="FEATURE_EXTRACTION", num_virtual_tokens=virtual_tokens(peft_cfg),
                  token_dim=backbone.config.hidden_size, num_transformer_submodules=1,
                  num_attention_heads=backbone.config.num_attention_heads,
                  num_layers=backbone.config.num_hidden_layers, base_model_name_or_path=_base_name(model_cfg))
    if isinstance(peft_cfg, PromptTuning):
        return PromptTuningConfig(**common)
    if isinstance(peft_cfg, PTuning):
        return PromptEncoderConfig(**common, encoder_reparameterization_type="MLP",
                                   encoder_hidden_size=peft_cfg.encoder_hidden_size)
    if isinstance(peft_cfg, Lora):
        return LoraConfig(task_type="FEATURE_EXTRACTION", r=peft_cfg.lora_r, lora_alpha=peft_cfg.lora_alpha,
                          lora_dropout=peft_cfg.lora_dropout, target_modules=lora_targets(backbone, peft_cfg),
                          base_model_name_or_path=_base_name(model_cfg))
    return None


def _base_name(model_cfg: ModelConfig) -> str:
    """What the adapter names as its base, portably: the hub id where the weights are the hub's (the
    packaged MiniLM), else the name securefpt resolves (`builtin:multilingual-e5-small` is a 4-bit
    copy, not the hub's weights), never a folder inside this machine's environment."""
    from securefpt.learning.builtin_models import BUILTIN_MINILM, model_facts

    return model_facts(BUILTIN_MINILM).hub_id if model_cfg.name == BUILTIN_MINILM else model_cfg.name


def _peft_name(name: str) -> str:
    """Our trainable parameter's name inside a PeftModel."""
    if name.startswith("prompt_encoder."):
        return "prompt_encoder.default." + name.removeprefix("prompt_encoder.")
    return "base_model.model." + name.removeprefix("backbone.")


def save_classifier(folder: Path, model_cfg: ModelConfig, peft_cfg: PeftConfig, arrays: Mapping[str, np.ndarray],
                    labels: list[str], seed: int) -> None:
    """Write the adapter, the head and their description into `folder` (see the module docstring)."""
    from peft import get_peft_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    head = {k: v for k, v in arrays.items() if k.startswith("head.")}
    if head:  # none where each node keeps its own head (personalization.local_head)
        save_arrays(folder / HEAD_FILE, head)
    description = {"head": "shared" if head else "local to each node",
                   "labels": labels, "pooling": model_cfg.pooling, "model": model_cfg.name,
                   "max_length": model_cfg.max_length, "peft_method": peft_cfg.method,
                   "num_virtual_tokens": virtual_tokens(peft_cfg)}
    (folder / CLASSIFIER_FILE).write_text(json.dumps(description, indent=2), encoding="utf-8")
    if peft_cfg.method == "full":
        return
    backbone = load_backbone(model_cfg, len(load_tokenizer(model_cfg)), seed)
    backbone.name_or_path = _base_name(model_cfg)  # PEFT names the base after the model instance
    model = get_peft_model(backbone, peft_config(model_cfg, peft_cfg, backbone))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in arrays.items():
            if not name.startswith("head."):
                params[_peft_name(name)].copy_(torch.as_tensor(np.asarray(value)))
    model.save_pretrained(str(folder), save_embedding_layers=False)  # the base stays frozen
