"""The command line as a user meets it: real subprocesses, exit codes, one-line errors."""

import json
import subprocess
import sys


from tests.conftest import TINY


def securefpt(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "securefpt.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_bad_config_exits_non_zero_with_one_line(tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("fl:\n  rounds: 0\n")
    res = securefpt("run", str(cfg), "--out", str(tmp_path / "out"))
    assert res.returncode == 2
    lines = [x for x in res.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "fl.rounds" in lines[0] and str(cfg) in lines[0]
    assert "Traceback" not in res.stderr


def test_missing_config_and_missing_data(tmp_path):
    res = securefpt("run", str(tmp_path / "none.yaml"))
    assert res.returncode == 2 and "not found" in res.stderr
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"data:\n  source: masakhanews_tsv\n  root: {tmp_path / 'absent'}\n  languages: [eng]\n")
    res = securefpt("run", str(cfg), "--set", "paradigm=centralized", *[f"--set={x}" for x in TINY])
    assert res.returncode == 2 and "eng/train.tsv: file not found" in res.stderr


def test_run_then_predict(tmp_path):
    out = tmp_path / "run"
    # the demo's federation policy forbids pooling data: the centralized baseline runs without it
    sets = [f"--set={x}" for x in TINY + ["paradigm=centralized", "fl.rounds=1", "policy=null", "clients=null"]]
    res = securefpt("demo", "--out", str(out), "--quiet", *sets)
    assert res.returncode == 0, res.stderr
    assert "avg" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    labels = summary["labels"]
    res = securefpt("predict", str(out), "The striker scored in the cup final", "Parliament votes on the budget")
    assert res.returncode == 0, res.stderr
    rows = [line.split("\t") for line in res.stdout.strip().splitlines()]
    assert len(rows) == 2
    for label, prob, _ in rows:
        assert label in labels and 0.0 < float(prob) <= 1.0


def test_predict_on_a_folder_that_is_not_a_run(tmp_path):
    res = securefpt("predict", str(tmp_path), "hello")
    assert res.returncode == 2 and "not a run directory" in res.stderr
