"""Classify new text with a finished run (`securefpt predict`): the run's own classifier, or a
node's personalized model (`node`: its state folder, or a client id under the run's `nodes/`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def predict(run_dir: Path, texts: list[str], language: Optional[str] = None,
            pairs: Optional[list[str]] = None, node: Optional[str] = None) -> list[tuple[str, float]]:
    """(label, probability) for each text (or each text and its pair)."""
    from securefpt import load_classifier

    return load_classifier(run_dir, language, node).predict(texts, pairs)
