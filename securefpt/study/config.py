"""A study: one base experiment and the grid of cells the paper's tables and figures need.

    name: masakhanews-study
    experiment: masakhanews.yaml          # the base experiment (relative to this file)
    set: [fl.rounds=5]                    # overrides of every cell
    cells:                                # Table 1/3 rows (section paradigms) and IID vs non-IID
      - {name: fl-prompt, section: paradigms, set: []}
      - {name: fl-iid, section: partitions, set: [data.partition.clients=5]}
    data_efficiency: {language: yor, train_split: train, sizes: [30, 100, 300]}
    distance: {cells: [monolingual, fl-prompt]}
    communication: {cells: [fl-full, fl-prompt, fl-lora]}

Every cell is one `securefpt run` of the base experiment with the study's and the cell's
overrides; data efficiency adds a federated and a monolingual cell per size.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, ValidationError, model_validator

from securefpt.errors import ConfigError
from securefpt.protocol.request import Strict
from securefpt.protocol.yaml_files import first_error, read_yaml_mapping

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class Cell(Strict):
    name: str
    section: Literal["paradigms", "partitions", "extra"] = "paradigms"
    set: list[str] = Field(default_factory=list)


class DataEfficiency(Strict):
    """Shrink one language's training set; federated and monolingual at each size (Section 5.2)."""

    language: str
    sizes: list[int] = Field(min_length=1)
    train_split: Optional[str] = None  # a larger split of that language (yor's train.tsv)
    federated_set: list[str] = Field(default_factory=list)  # how the federated side runs (e.g. a method)

    @model_validator(mode="after")
    def _sizes(self) -> "DataEfficiency":
        if any(n < 1 for n in self.sizes) or len(set(self.sizes)) != len(self.sizes):
            raise ValueError("data_efficiency.sizes: distinct positive sizes")
        return self


class Distance(Strict):
    """Accuracy against each language's distance to the model's pretraining languages (Section 5.3)."""

    cells: list[str] = Field(min_length=1)
    features: list[str] = Field(default_factory=lambda: ["syntax_knn", "phonology_knn", "inventory_knn"])


class Communication(Strict):
    """Trainable parameters and measured bytes per method (Table 4)."""

    cells: list[str] = Field(min_length=1)


class StudyConfig(Strict):
    name: str
    experiment: Path
    set: list[str] = Field(default_factory=list)
    cells: list[Cell] = Field(default_factory=list)
    data_efficiency: Optional[DataEfficiency] = None
    distance: Optional[Distance] = None
    communication: Optional[Communication] = None

    @model_validator(mode="after")
    def _names(self) -> "StudyConfig":
        names = [c.name for c in self.all_cells()]
        bad = [n for n in names if not NAME.match(n)]
        if bad:
            raise ValueError(f"cell names must be lower-case file names: {bad}")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"cells named twice: {repeated}")
        for section in (self.distance, self.communication):
            missing = sorted(set(section.cells) - set(names)) if section else []
            if missing:
                raise ValueError(f"unknown cells {missing} (cells: {names})")
        return self

    def all_cells(self) -> list[Cell]:
        cells = list(self.cells)
        eff = self.data_efficiency
        for size in eff.sizes if eff else []:
            own = [f"data.per_language.{eff.language}.max_train={size}"]
            if eff.train_split:
                own.append(f"data.per_language.{eff.language}.train_split={eff.train_split}")
            cells.append(Cell(name=f"efficiency-federated-{size}", section="extra", set=own + eff.federated_set))
            cells.append(Cell(name=f"efficiency-monolingual-{size}", section="extra",
                              set=own + ["paradigm=monolingual"]))
        return cells


def load_study(path: Path | str) -> StudyConfig:
    path = Path(path)
    raw = read_yaml_mapping(path)
    try:
        study = StudyConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {first_error(exc)}") from None
    experiment = study.experiment if study.experiment.is_absolute() else path.resolve().parent / study.experiment
    if not experiment.is_file():
        raise ConfigError(f"{path}: experiment: {experiment} not found")
    return study.model_copy(update={"experiment": experiment})
