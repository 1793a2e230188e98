"""`flwr run .` from a clean copy of the repository, as a user who knows Flower would run it.

Flower's own CLI starts its local SuperLink (simulation), installs the app from the copy and
runs it: the run config names the experiment, every virtual node reads its own node file, and
the result table and run directory are printed. Loopback only; the SuperLink is stopped after.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from securefpt.engines.flower_home import write_flower_home

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def clean_copy(tmp_path):
    """The repository's files as a clone has them (tracked, and new ones not ignored)."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"], capture_output=True,
                            text=True, check=True).stdout.splitlines()
    copy = tmp_path / "repo"
    for name in listed:
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    return copy


def test_flwr_run_runs_the_experiment_on_flowers_local_simulation(clean_copy, tmp_path):
    experiment = clean_copy / "server" / "deploy-tiny.yaml"  # four languages, secure aggregation
    write_flower_home(tmp_path / "flwr-home", experiment)  # what scripts/setup.sh writes to .flwr/
    http, control = free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "FLWR_HOME": str(tmp_path / "flwr-home"),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "SECUREFPT_FLWR_SIMULATION": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http),
           "FLWR_LOCAL_CONTROL_API_PORT": str(control), "SECUREFPT_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    out = tmp_path / "out"
    command = [str(BIN / "flwr"), "run", ".", "--stream", "--run-config",
               f'experiment="{experiment}" out-dir="{out}"']
    try:
        first = subprocess.run(command, cwd=clean_copy, env=env, capture_output=True, text=True, timeout=420)
        summary = json.loads((out / "summary.json").read_text())
        assert [r["participants"] for r in summary["rounds"]] == [["eng", "fra", "hau", "swa"]] * 2
        assert summary["secure_aggregation"]["enabled"] and summary["secure_aggregation"]["aborted_rounds"] == []
        assert "(4 simulated SuperNodes)" in first.stdout + first.stderr  # sized for the experiment
        assert "│ avg" in first.stdout and f"run directory: {out}" in first.stdout
        assert (out / "adapter_config.json").is_file()
        # the same command again: a clear refusal, no traceback
        again = subprocess.run(command, cwd=clean_copy, env=env, capture_output=True, text=True, timeout=420)
        assert f"error: {out} holds a finished run (summary.json)" in again.stdout + again.stderr
        assert "Traceback" not in again.stdout + again.stderr
    finally:  # Flower leaves its local SuperLink running: stop it (and its SuperExec)
        found = subprocess.run(["pgrep", "-f", f"flower-superlink.*--port {http}"], capture_output=True, text=True)
        for pid in found.stdout.split():
            os.kill(int(pid), signal.SIGTERM)


def test_the_app_declares_the_version_flower_requires_and_the_cli_reports():
    """`flwr run .` refuses a pyproject.toml without a static [project].version (a dynamic one broke every
    Flower-run test once); the study cache keys cells on securefpt.__version__, so the two must agree."""
    import tomllib
    from flwr.common.config import validate_fields_in_config

    import securefpt

    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    valid, errors, _ = validate_fields_in_config(config)
    assert valid, errors
    assert config["project"]["version"] == securefpt.__version__
