"""An operator's local trial data: the label space and each language's rows, as the experiment's
`data` section describes them (the baselines, the simulation's trial nodes, DP planning)."""

from __future__ import annotations

from pathlib import Path

from securefpt.experiment.config import DataConfig
from securefpt.learning.data import ClientData, load_examples, read_rows


def label_space(cfg: DataConfig) -> list[str]:
    """The union of the participating languages' labels, sorted (one shared head)."""
    labels: set[str] = set()
    for language in cfg.languages:
        listed = Path(cfg.root) / language / "labels.txt" if cfg.root is not None else None
        if cfg.source == "masakhanews_tsv" and listed is not None and listed.is_file():
            labels.update(x.strip() for x in listed.read_text(encoding="utf-8").split() if x.strip())
        else:
            for split in (cfg.train_split_of(language), cfg.eval_split):
                labels.update(row.label for row in read_rows(cfg, language, split))
    return sorted(labels)


def load_client_data(cfg: DataConfig, language: str, labels: list[str], seed: int) -> ClientData:
    """A language's data as an experiment's local-trial section describes it (baselines, trial nodes)."""
    binding = cfg.model_copy(update={"train_split": cfg.train_split_of(language)})
    return load_examples(binding, language, labels, cfg.max_train_of(language), cfg.max_eval_per_client, seed)
