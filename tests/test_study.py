"""`securefpt study`: a tiny study end to end, interrupted by a real Ctrl-C and resumed."""

import json
import os
import re

import pytest

from tests.test_cli import securefpt

pytestmark = pytest.mark.slow

BASE = """name: tiny
model: {name: "builtin:tiny", max_length: 32}
peft: {method: prompt_tuning, num_virtual_tokens: 4}
data: {source: demo, languages: [eng, fra, hau], max_train_per_client: 12, max_eval_per_client: 10}
fl: {rounds: 2, batch_size: 4}
"""
STUDY = """name: tiny-study
experiment: base.yaml
set: [secagg.enabled=false]
cells:
  - {name: monolingual, set: [paradigm=monolingual]}
  - {name: fl-prompt}
  - {name: fl-lora, set: [peft.method=lora]}
  - {name: fl-dirichlet, section: partitions, set: [data.partition.clients=3, data.partition.scheme=dirichlet]}
data_efficiency: {language: hau, sizes: [4]}
distance: {cells: [monolingual, fl-prompt]}
communication: {cells: [fl-prompt, fl-lora]}
"""
PNG = b"\x89PNG\r\n\x1a\n"


def _cells(out):
    return {p.parent.name: json.loads(p.read_text()) for p in (out / "cells").glob("*/cell.json")}


def test_a_study_resumes_after_an_interruption_without_redoing_finished_cells(tmp_path, monkeypatch):
    (tmp_path / "base.yaml").write_text(BASE)
    (tmp_path / "study.yaml").write_text(STUDY)
    out = tmp_path / "out"
    # The operator presses Ctrl-C right after fl-prompt's first round (a real SIGINT, the engine's drill).
    monkeypatch.setenv("SECUREFPT_FAULTS", "coordinator@round-1:sigint")
    first = securefpt("study", str(tmp_path / "study.yaml"), "--out", str(out), "--quiet")
    assert first.returncode == 130, first.stderr
    assert "run the same command to resume" in first.stderr
    assert set(_cells(out)) == {"monolingual"}  # fl-prompt stopped mid-run: not recorded as finished
    assert (out / "cells" / "fl-prompt" / "config.yaml").is_file()  # ... though it had started
    kept = (out / "cells" / "monolingual" / "cell.json").stat().st_mtime_ns

    monkeypatch.delenv("SECUREFPT_FAULTS")
    second = securefpt("study", str(tmp_path / "study.yaml"), "--out", str(out), "--quiet")
    assert second.returncode == 0, second.stderr
    assert re.search(r"monolingual: finished earlier", second.stderr)
    assert (out / "cells" / "monolingual" / "cell.json").stat().st_mtime_ns == kept  # not redone
    cells = _cells(out)
    names = ["monolingual", "fl-prompt", "fl-lora", "fl-dirichlet", "efficiency-federated-4",
             "efficiency-monolingual-4"]
    assert sorted(cells) == sorted(names)
    assert len(re.findall(r": running", second.stderr)) == len(names) - 1
    for name in names:  # every cell ran whole: both rounds (fl-prompt afresh, not from its stopped state)
        summary = json.loads((out / "cells" / name / "summary.json").read_text())
        assert len(summary["rounds"]) == 2
    assert cells["fl-lora"]["trainable_params"] > cells["fl-prompt"]["trainable_params"]

    report = (out / "report.md").read_text()
    for heading in ("Table 1/3: paradigms", "Table 2: IID vs non-IID", "Data efficiency: hau",
                    "Language distance", "Table 4: what federated tuning sends"):
        assert f"## {heading}" in report
    for png in ("paradigms", "partitions", "data_efficiency", "language_distance"):
        assert f"({png}.png)" in report and (out / f"{png}.png").read_bytes()[:8] == PNG
    # the tables hold the cells' own figures
    fl = cells["fl-prompt"]["accuracy"]
    assert f"| fl-prompt | PE federated (prompt_tuning) | {100 * fl['eng']:.1f} | {100 * fl['fra']:.1f} | " \
           f"{100 * fl['hau']:.1f} | {100 * fl['avg']:.1f} |" in report
    eff = [cells[f"efficiency-{p}-4"]["accuracy"]["hau"] for p in ("federated", "monolingual")]
    assert f"| 4 | {100 * eff[0]:.1f} | {100 * eff[1]:.1f} | {100 * (eff[0] - eff[1]):+.1f} |" in report
    assert f"{cells['fl-prompt']['bytes'] / 1e6:,.2f}" in report
    partition = json.loads((out / "cells" / "fl-dirichlet" / "partitions" / "partitions.json").read_text())
    assert partition["scheme"] == "dirichlet" and len(partition["clients"]) == 3
    assert set(cells["fl-dirichlet"]["accuracy"]) == {"eng", "fra", "hau", "avg"}  # per language, not per client
    assert set(cells["fl-dirichlet"]["client_accuracy"]) == {"client00", "client01", "client02", "avg"}

    # A finished study runs nothing again; a changed cell runs again, alone.
    (tmp_path / "study.yaml").write_text(STUDY.replace("sizes: [4]", "sizes: [4], federated_set: [fl.lr=0.01]"))
    third = securefpt("study", str(tmp_path / "study.yaml"), "--out", str(out), "--quiet")
    assert third.returncode == 0, third.stderr
    assert re.findall(r"\] ([\w.-]+): running", third.stderr) == ["efficiency-federated-4"]


def test_a_cell_measured_by_another_securefpt_is_run_again(tmp_path):
    """A cached figure is reused only for the same experiment and the same securefpt (the code that
    measured it); an older record would also lack the fields a newer report reads."""
    from securefpt import __version__
    from securefpt.experiment.loading import load_config
    from securefpt.study.runner import CELL_RECORD, finished

    (tmp_path / "base.yaml").write_text(BASE)
    cfg = load_config(tmp_path / "base.yaml")
    record = {"experiment_sha256": cfg.sha256(), "securefpt": __version__, "accuracy": {"avg": 0.5}}
    (tmp_path / CELL_RECORD).write_text(json.dumps(record))
    assert finished(tmp_path, cfg) == record
    assert finished(tmp_path, load_config(tmp_path / "base.yaml", ["fl.lr=0.01"])) is None
    (tmp_path / CELL_RECORD).write_text(json.dumps({**record, "securefpt": "0.0.1"}))
    assert finished(tmp_path, cfg) is None


def test_a_bad_study_file_is_one_line(tmp_path):
    (tmp_path / "base.yaml").write_text(BASE)
    (tmp_path / "study.yaml").write_text(STUDY.replace("cells: [monolingual, fl-prompt]", "cells: [nope]"))
    result = securefpt("study", str(tmp_path / "study.yaml"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "unknown cells ['nope']" in result.stderr
    assert not (tmp_path / "o").exists()
    os.remove(tmp_path / "base.yaml")
    (tmp_path / "study.yaml").write_text(STUDY)
    result = securefpt("study", str(tmp_path / "study.yaml"))
    assert result.returncode == 2 and "base.yaml not found" in result.stderr


def test_the_shipped_masakhanews_study_is_valid_and_covers_the_paper():
    from pathlib import Path

    from securefpt.study.config import load_study
    from securefpt.study.runner import cell_config

    study = load_study(Path(__file__).resolve().parents[1] / "server" / "masakhanews-study.yaml")
    configs = {cell.name: cell_config(study, cell) for cell in study.all_cells()}
    federated = {c.peft.method for c in configs.values() if c.paradigm == "federated" and c.data.partition is None}
    assert federated == {"prompt_tuning", "p_tuning", "lora", "full"}
    assert {(c.paradigm, c.peft.method) for c in configs.values()} >= {
        ("monolingual", "prompt_tuning"), ("centralized", "prompt_tuning"), ("monolingual", "full"),
        ("centralized", "full")}
    assert {c.data.partition.scheme for c in configs.values() if c.data.partition} == {"iid", "dirichlet"}
    assert min(study.data_efficiency.sizes) == 30
    assert all(not c.personalization.planned for c in configs.values())  # the paper's setting: one shared head
