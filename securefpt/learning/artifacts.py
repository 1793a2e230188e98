"""Trainable parameters on disk, keyed by name (safetensors): run artifacts and checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import numpy as np

ARTIFACT = "prompt_encoder.safetensors"  # a run's trainable parameters, keyed by name


def save_arrays(path: Path, arrays: "Mapping[str, np.ndarray]", metadata: Optional[dict] = None) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path), metadata=metadata)


def load_arrays(path: Path) -> "dict[str, np.ndarray]":
    from safetensors.numpy import load_file

    return load_file(str(path))
