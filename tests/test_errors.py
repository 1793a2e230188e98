"""Bad input fails fast and clean: one line on stderr, exit code 2, nothing left behind."""

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import TINY, make_masakhanews_like, tsv_cfg_overrides


def securefpt(*args):
    return subprocess.run([sys.executable, "-m", "securefpt.cli", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "COLUMNS": "250"})


def fails_cleanly(res, *words):
    lines = [x for x in res.stderr.strip().splitlines() if x.strip()]
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def data(tmp_path):
    return make_masakhanews_like(tmp_path / "data", ["aa", "bb"])


def run(tmp_path, *sets):
    start = time.perf_counter()
    res = securefpt("run", *[f"--set={s}" for s in TINY + list(sets)], "--out", str(tmp_path / "run"), "--quiet",
                    str(tmp_path / "exp.yaml"))
    return res, time.perf_counter() - start


@pytest.mark.parametrize("case", ["label", "empty", "missing-one-language", "model", "roundz"])
def test_a_data_or_model_mistake_is_one_line_in_seconds_and_writes_nothing(tmp_path, data, case):
    (tmp_path / "exp.yaml").write_text("name: e\n")
    sets = tsv_cfg_overrides(data, ["aa", "bb"])
    if case == "label":  # the data has a label the experiment's label space lacks
        sets.append("data.labels=[health, politics]")
        words = ["aa/test: label 'sports' is not in the label space"]
    elif case == "empty":
        (data / "bb" / "test.tsv").write_text("category\theadline\ttext\turl\n")
        words = ["bb: no training examples in split 'test'"]
    elif case == "missing-one-language":
        sets = tsv_cfg_overrides(data, ["cc"])
        words = ["cc/test.tsv: file not found"]
    elif case == "model":
        sets.append(f"model.name={tmp_path / 'no-such-model'}")
        words = ["cannot load it offline", "SECUREFPT_ALLOW_DOWNLOAD=1"]
    else:
        sets.append("fl.roundz=1")
        words = ["--set: fl.roundz: unknown key"]
    res, seconds = run(tmp_path, *sets)
    fails_cleanly(res, *words)
    assert not (tmp_path / "run").exists()
    assert seconds < 60  # the engine never started (a started one takes longer on 2 cores)


def test_an_out_that_is_a_file_and_a_run_directory_of_another_experiment(tmp_path, data):
    (tmp_path / "exp.yaml").write_text("name: e\n")
    (tmp_path / "run").write_text("a file")
    res, _ = run(tmp_path, *tsv_cfg_overrides(data, ["aa", "bb"]))
    fails_cleanly(res, "--out", "a file is there")
    (tmp_path / "run").unlink()
    (tmp_path / "run").mkdir()  # a run of another experiment that failed before its first round
    (tmp_path / "run" / "audit.jsonl").write_text('{"seq": 0, "event": "run_start", "config_sha256": "abc"}\n')
    res, _ = run(tmp_path, *tsv_cfg_overrides(data, ["aa", "bb"]))
    fails_cleanly(res, "holds the log of another experiment")


@pytest.mark.parametrize("args,words", [
    (["audit", "report", "{tmp}/nothing.jsonl"], ["not an audit log"]),
    (["audit", "verify", "{tmp}/nothing.jsonl", "--public-key", "{tmp}/nothing.pub"], ["nothing"]),
    (["keys", "demo", "{tmp}/file"], ["file"]),
    (["certs", "{tmp}/file"], ["file"]),
    (["predict", "{tmp}", "text"], ["not a run directory"]),
    (["node", "report", "{tmp}/nothing.yaml"], ["not found"]),
    (["policy", "explain", "{tmp}/nothing.yaml", "--clients", "{tmp}"], ["no institution manifests"]),
])
def test_every_command_fails_in_one_line(tmp_path, args, words):
    (tmp_path / "file").write_text("not a folder")
    fails_cleanly(securefpt(*[a.format(tmp=tmp_path) for a in args]), *words)
