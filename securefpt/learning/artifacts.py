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


_TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
                 "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def mapped_safetensors(path: Path) -> "dict[str, object]":
    """A safetensors file's tensors as torch views of one private, copy-on-write memory map of the file
    (nothing is read until used; processes mapping the same file share its pages)."""
    import json
    import struct

    import torch

    path = Path(path)
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
    start = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] not in _TORCH_DTYPES:
            continue
        dtype = getattr(torch, _TORCH_DTYPES[info["dtype"]])
        begin, end = info["data_offsets"]
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if (start + begin) % itemsize:
            continue  # unaligned: left to the regular loader
        tensor = torch.empty(0, dtype=dtype).set_(storage, (start + begin) // itemsize, tuple(info["shape"]))
        out[name] = tensor
    return out
