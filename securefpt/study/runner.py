"""`securefpt study CONFIG`: run a study's cells, each once, and write its report.

A cell is one experiment (the base with the study's and the cell's overrides) run into
`STUDY/cells/<name>/`. A finished cell leaves `cell.json` (the experiment's digest, the
securefpt version that measured it, and the figures the report needs) and is never run
again while both are unchanged; a cell that was interrupted, whose experiment changed, or
that an older securefpt measured, is cleared and run afresh. So an interrupted study
resumes with the same command where it stopped. The data files are not part of the key:
after editing them, run into a new study folder.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from securefpt import __version__
from securefpt.experiment.config import ExperimentConfig
from securefpt.experiment.loading import load_config
from securefpt.study.config import Cell, StudyConfig

CELL_RECORD = "cell.json"


def cell_config(study: StudyConfig, cell: Cell) -> ExperimentConfig:
    cfg = load_config(study.experiment, list(study.set) + list(cell.set))
    return cfg.model_copy(update={"name": f"{study.name}-{cell.name}"})


def language_accuracy(run_dir: Path, cfg: ExperimentConfig) -> dict[str, float]:
    """Accuracy of a run's final global model on each language's own evaluation rows (the same rows a
    language's client evaluates), for runs whose clients are partitions rather than languages."""
    from securefpt.experiment.trial_data import load_client_data
    from securefpt.learning.artifacts import ARTIFACT, load_arrays
    from securefpt.learning.modeling import build_model, set_trainable
    from securefpt.learning.training import evaluate

    labels = json.loads((run_dir / "labels.json").read_text(encoding="utf-8"))
    assembled = build_model(cfg.model, cfg.peft, len(labels), cfg.seed)
    set_trainable(assembled.model, load_arrays(run_dir / ARTIFACT))
    accuracy = {language: evaluate(assembled, load_client_data(cfg.data, language, labels, cfg.seed).eval,
                                   cfg.fl.eval_batch_size).accuracy for language in cfg.data.languages}
    accuracy["avg"] = sum(accuracy.values()) / len(cfg.data.languages)
    return accuracy


def _record(cfg: ExperimentConfig, summary: dict, run_dir: Path, seconds: float) -> dict:
    by_language = summary["final"]["accuracy"]
    if cfg.data.partition is not None and cfg.paradigm != "monolingual":
        by_language = language_accuracy(run_dir, cfg)
    return {"experiment_sha256": cfg.sha256(), "securefpt": __version__, "seconds": round(seconds, 1),
            "paradigm": cfg.paradigm, "peft_method": cfg.peft.method,
            "partition": cfg.data.partition.model_dump() if cfg.data.partition else None,
            "accuracy": by_language, "client_accuracy": summary["final"]["accuracy"],
            "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
            "bytes": summary["communication"]["bytes_up"] + summary["communication"]["bytes_down"],
            "clients": len(summary["clients"]), "rounds": len(summary["rounds"])}


def finished(folder: Path, cfg: ExperimentConfig) -> Optional[dict]:
    path = folder / CELL_RECORD
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    same = record.get("experiment_sha256") == cfg.sha256() and record.get("securefpt") == __version__
    return record if same else None


def run_study(study: StudyConfig, out: Path, show_progress: bool = True,
              say: Callable[[str], None] = print) -> dict[str, dict]:
    """Run every cell not yet finished, in order; the records of all cells, by name."""
    from securefpt.engines.runner import run_experiment

    cells = study.all_cells()
    configs = {cell.name: cell_config(study, cell) for cell in cells}  # every cell validated before any runs
    records: dict[str, dict] = {}
    started = time.perf_counter()
    for number, cell in enumerate(cells, start=1):
        folder = out / "cells" / cell.name
        cfg = configs[cell.name]
        done = finished(folder, cfg)
        if done is not None:
            records[cell.name] = done
            say(f"[{number}/{len(cells)}] {cell.name}: finished earlier (avg {done['accuracy']['avg']:.3f})")
            continue
        if folder.exists():  # interrupted, or its experiment changed: start it afresh
            shutil.rmtree(folder)
        say(f"[{number}/{len(cells)}] {cell.name}: running ({time.perf_counter() - started:.0f} s into this session)")
        begin = time.perf_counter()
        summary = run_experiment(cfg, folder, show_progress=show_progress)
        record = _record(cfg, summary, folder, time.perf_counter() - begin)
        (folder / CELL_RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
        records[cell.name] = record
        say(f"[{number}/{len(cells)}] {cell.name}: avg {record['accuracy']['avg']:.3f} in {record['seconds']:.0f} s")
    return records
