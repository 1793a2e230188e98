"""Classify new text with a finished run (`securefpt predict`): the run's own classifier."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from securefpt.learning.classifier import load_classifier


def predict(run_dir: Path, texts: list[str], language: Optional[str] = None,
            pairs: Optional[list[str]] = None) -> list[tuple[str, float]]:
    """(label, probability) for each text (or each text and its pair)."""
    return load_classifier(run_dir, language).predict(texts, pairs)
