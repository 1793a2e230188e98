"""Private text data: readers and deterministic sampling.

Sources: `masakhanews_tsv` (a root of language folders holding the upstream TSVs),
`hf` (a hub dataset through `datasets.load_dataset`), `csv` / `jsonl` (a root of
language folders with `<split>.csv` / `<split>.jsonl` holding `text`, `label` and, for
sentence pairs, `text_pair`), and
`demo` (the small multilingual set shipped inside the package, see
docs/demo_data.md).

A *binding* says where one language's data lives: a node's `DataBinding` (its own
configuration) or, for local trials and baselines, the experiment's `DataConfig`; both
are a `DataSource` (learning/data_source.py). The trial data's label space and per-language
reading are the operator's (experiment/trial_data.py).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, NamedTuple, Optional

from securefpt.errors import DataError
from securefpt.learning.data_source import DataSource
from securefpt.offline import datasets_offline, downloads_allowed


@dataclass(frozen=True)
class Example:
    text: str
    label: int
    pair: Optional[str] = None  # the second sentence of a pair task (tokenized as a pair)


class Row(NamedTuple):
    """One record as read, its label still the source's name for it."""

    text: str
    label: str
    pair: Optional[str] = None


@dataclass
class ClientData:
    """One client's private data (never leaves the client)."""

    language: str
    train: list[Example]
    eval: list[Example]


# ---------------------------------------------------------------- file readers


def read_masakhanews_tsv(path: Path) -> list[Row]:
    """(text, label) pairs of a MasakhaNEWS TSV; text is headline + body.

    The body may hold quoted newlines and tabs, so a real CSV parser reads it.
    """
    import pandas as pd

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises several parser error types
        raise DataError(f"{path}: cannot parse as TSV ({exc})") from None
    for column in ("category", "text"):
        if column not in frame.columns:
            raise DataError(f"{path}: missing column '{column}' (has {list(frame.columns)})")
    headline = frame["headline"] if "headline" in frame.columns else [""] * len(frame)
    rows = []
    for head, body, label in zip(headline, frame["text"], frame["category"]):
        text = f"{head.strip()}. {body.strip()}" if head.strip() else body.strip()
        rows.append(Row(text, label.strip()))
    return rows


def read_labeled_file(path: Path) -> list[Row]:
    """Rows of a `.csv` (columns text,label[,text_pair]) or `.jsonl` file."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix == ".csv":
        import pandas as pd

        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        except Exception as exc:
            raise DataError(f"{path}: cannot parse as CSV ({exc})") from None
        records: Iterable[dict] = frame.to_dict("records")
    else:
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{path}:{number}: not a JSON object") from None
    rows = []
    for number, rec in enumerate(records, 1):
        if "text" not in rec or "label" not in rec:
            raise DataError(f"{path}: record {number} needs 'text' and 'label'")
        pair = rec.get("text_pair")
        rows.append(Row(str(rec["text"]), str(rec["label"]), None if pair is None else str(pair)))
    return rows


def _demo_file(language: str) -> Path:
    ref = resources.files("securefpt") / "demo_data" / f"{language}.jsonl"
    path = Path(str(ref))
    if not path.is_file():
        raise DataError(f"demo data has no language '{language}' (has {demo_languages()})")
    return path


def demo_languages() -> list[str]:
    folder = Path(str(resources.files("securefpt") / "demo_data"))
    return sorted(p.stem for p in folder.glob("*.jsonl"))


# ---------------------------------------------------------------- splits


def read_rows(cfg: DataSource, language: str, split: str) -> list[Row]:
    if cfg.source == "masakhanews_tsv":
        return read_masakhanews_tsv(Path(cfg.root) / language / f"{split}.tsv")
    if cfg.source in ("csv", "jsonl"):
        return read_labeled_file(Path(cfg.root) / language / f"{split}.{cfg.source}")
    if cfg.source == "demo":
        rows = [json.loads(x) for x in _demo_file(language).read_text(encoding="utf-8").splitlines() if x]
        wanted = "train" if split == cfg.train_split else "eval"
        return [Row(r["text"], r["label"]) for r in rows if r["split"] == wanted]
    return _hf_rows(cfg, language, split)


def _hf_rows(cfg: DataSource, language: str, split: str) -> list[Row]:
    hf = cfg.hf
    assert hf is not None
    real_split = hf.train_split if split == cfg.train_split else hf.eval_split
    name = hf.name.format(lang=language) if hf.name else None
    path = hf.path.format(lang=language)
    try:
        import datasets

        datasets_offline()
        if hf.from_disk:
            ds = datasets.load_from_disk(path)[real_split]
        else:
            files = {k: [v.format(lang=language) for v in ([f] if isinstance(f, str) else f)]
                     for k, f in (hf.data_files or {}).items()} or None
            ds = datasets.load_dataset(path, name, data_files=files, split=real_split)
    except Exception as exc:  # offline, missing config, unknown split ...
        hint = "" if downloads_allowed() else (" (offline: SECUREFPT_ALLOW_DOWNLOAD=1 allows downloads; local files "
                                               "load with data.hf.data_files or from_disk)")
        raise DataError(
            f"data.hf: cannot load {path}"
            + (f" ({name})" if name else "")
            + f" split {real_split}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}{hint}"
        ) from None
    if hf.language_field:
        ds = ds.filter(lambda r: r[hf.language_field] == language)
    text_fields = [hf.text_field] if isinstance(hf.text_field, str) else list(hf.text_field)
    for field in [*text_fields, hf.label_field] + ([hf.pair_field] if hf.pair_field else []):
        if field not in ds.column_names:
            raise DataError(f"data.hf: field '{field}' not in {ds.column_names}")
    feature = ds.features[hf.label_field]
    label_names = feature.names if hasattr(feature, "names") else None  # a ClassLabel's names
    rows = []
    for rec in ds:
        label = rec[hf.label_field]
        if label_names is not None and label == -1:  # hub convention: an unlabeled row (XNLI's test-less splits)
            continue
        text = ". ".join(str(rec[f]).strip() for f in text_fields if str(rec[f]).strip())
        rows.append(Row(text, label_names[label] if label_names else str(label),
                        str(rec[hf.pair_field]) if hf.pair_field else None))
    return rows


def _sample(rows: list[Row], cap: int | None, seed: int, tag: str) -> list[Row]:
    rows = list(rows)
    random.Random(f"{seed}:{tag}").shuffle(rows)
    return rows[:cap] if cap is not None else rows


class LabelError(DataError):
    """A row's label is outside the task's label space."""


def load_examples(binding: DataSource, language: str, labels: list[str], max_train: int | None, max_eval: int | None,
                  seed: int, label_map: dict[str, str] | None = None) -> ClientData:
    """One language's train/eval examples from a binding, labels mapped onto the task's label
    space (`label_map`: own label -> task label), capped and shuffled deterministically."""
    index = {name: i for i, name in enumerate(labels)}
    label_map = label_map or {}

    def encode(rows: list[Row], split: str) -> list[Example]:
        out = []
        for row in rows:
            label = label_map.get(row.label, row.label)
            if label not in index:
                raise LabelError(f"{language}/{split}: label '{label}' is not in the label space {labels}")
            out.append(Example(text=row.text, label=index[label], pair=row.pair))
        return out

    train = _sample(read_rows(binding, language, binding.train_split), max_train, seed, f"{language}:train")
    evals = _sample(read_rows(binding, language, binding.eval_split), max_eval, seed, f"{language}:eval")
    if not train:
        raise DataError(f"{language}: no training examples in split '{binding.train_split}'")
    if not evals:
        raise DataError(f"{language}: no evaluation examples in split '{binding.eval_split}'")
    return ClientData(language=language, train=encode(train, binding.train_split),
                      eval=encode(evals, binding.eval_split))


def load_canaries(path: Path, labels: list[str]) -> list[Example]:
    """A privacy audit's canary records (text, label in the task's label space)."""
    index = {name: i for i, name in enumerate(labels)}
    rows = read_labeled_file(Path(path))
    outside = sorted({r.label for r in rows} - set(index))
    if outside:
        raise DataError(f"{path}: canary labels {outside} are not in the label space {labels}")  # not a label answer
    return [Example(text=r.text, label=index[r.label], pair=r.pair) for r in rows]
