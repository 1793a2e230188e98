"""Classify new text with a finished run's trainable parameters and the frozen PLM."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from securefpt.config import ExperimentConfig, load_config
from securefpt.errors import ConfigError
from securefpt.learning.modeling import build_model, set_trainable
from securefpt.coordinator.run_dir import ARTIFACT
from securefpt.learning.artifacts import load_arrays


def load_predictor(run_dir: Path, language: Optional[str] = None):
    run_dir = Path(run_dir)
    for name in ("config.yaml", "labels.json"):
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir}: not a run directory ({name} missing)")
    cfg: ExperimentConfig = load_config(run_dir / "config.yaml")
    labels = json.loads((run_dir / "labels.json").read_text(encoding="utf-8"))
    artifact = run_dir / (f"prompt_encoder.{language}.safetensors" if language else ARTIFACT)
    if not artifact.is_file():
        hint = " (a monolingual run keeps one per language: pass --language)" if cfg.paradigm == "monolingual" else ""
        raise ConfigError(f"{artifact}: not found{hint}")
    assembled = build_model(cfg.model, cfg.peft, len(labels), cfg.seed)
    set_trainable(assembled.model, load_arrays(artifact))
    assembled.model.eval()
    return assembled, labels


@torch.no_grad()
def predict(run_dir: Path, texts: list[str], language: Optional[str] = None) -> list[tuple[str, float]]:
    """(label, probability) for each text."""
    assembled, labels = load_predictor(run_dir, language)
    enc = assembled.tokenizer(texts, truncation=True, max_length=assembled.max_text_tokens,
                              padding=True, return_tensors="pt")
    probs = torch.softmax(assembled.model(enc["input_ids"], enc["attention_mask"]), dim=-1)
    best = probs.argmax(-1)
    return [(labels[int(i)], float(probs[row, i])) for row, i in enumerate(best)]
