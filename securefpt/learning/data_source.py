"""Where a language's rows come from: one model for a node's data binding and an operator's trial data.

A node binds its data for a task in its own configuration (node/config.py `DataBinding`);
an operator's local trial names where the trial nodes' data lives (experiment/config.py
`DataConfig`). Both are a `DataSource`, read by learning/data.py; neither ever travels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import model_validator

from securefpt.protocol.request import Strict

SourceKind = Literal["demo", "masakhanews_tsv", "hf", "csv", "jsonl"]


class HFDataConfig(Strict):
    """A dataset read with `datasets` for `data.source: hf`: a hub id (cached, or downloaded where
    SECUREFPT_ALLOW_DOWNLOAD=1), a builder with local `data_files` in hub formats (`path: json`,
    `csv`, `parquet`), or a folder written by `save_to_disk` (`from_disk: true`)."""

    path: str
    """"{lang}" is replaced by the language (one save_to_disk folder per language)"""
    name: Optional[str] = None
    """A config name; "{lang}" is replaced by the language."""
    data_files: Optional[dict[str, Union[str, list[str]]]] = None
    """Split -> file(s), for a builder."""
    from_disk: bool = False
    """path is a folder written by save_to_disk."""
    train_split: str = "train"
    """The training split's name."""
    eval_split: str = "validation"
    """The evaluation split's name."""
    text_field: Union[str, list[str]] = "text"
    """Several fields (a title and a body) are joined with ". "."""
    pair_field: Optional[str] = None
    """The second text of a sentence pair (XNLI: premise / hypothesis)"""
    label_field: str = "label"
    """The field that holds the label."""
    language_field: Optional[str] = None
    """A field that names each row's language (one dataset for all languages); None: one dataset per language."""


class DataSource(Strict):
    """A source of labeled rows, one folder (or dataset filter) per language."""

    source: SourceKind = "demo"
    """demo (the packaged demo data), masakhanews_tsv, csv or jsonl (a folder per language), or hf (`datasets`)."""
    root: Optional[Path] = None
    """The folder of masakhanews_tsv, csv or jsonl data (one folder per language holding <split>.<ext>)."""
    train_split: str = "train"
    """The split trained on (MasakhaNEWS protocol: test)."""
    eval_split: str = "dev"
    """The split evaluated on."""
    hf: Optional[HFDataConfig] = None
    """source: hf: the dataset and its fields."""

    @model_validator(mode="after")
    def _source_needs(self) -> "DataSource":
        if self.source in ("masakhanews_tsv", "csv", "jsonl") and self.root is None:
            raise ValueError(f"root is required for source={self.source}")
        if self.source == "hf" and self.hf is None:
            raise ValueError("hf is required for source=hf")
        return self
