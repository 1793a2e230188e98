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


@pytest.mark.slow
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
        # quiet as `securefpt run`: no Flower per-round lines, no node's debug log, no library warnings
        assert "configure_fit" not in first.stdout + first.stderr and "DEBUG" not in first.stdout + first.stderr
        assert "Warning:" not in first.stdout.replace("⚠️ Warning: `options.`", "")
        # a spare virtual node: one line that says which federation config to use, nothing trained or left
        spare = subprocess.run([*command[:-1], f'experiment="{experiment}" out-dir="{tmp_path / "spare"}"',
                                "--federation-config", "num-supernodes=5"],
                               cwd=clean_copy, env=env, capture_output=True, text=True, timeout=420)
        assert ("error: Flower's simulation started 5 virtual nodes and this experiment has 4 institutions: "
                'flwr run . --federation-config "num-supernodes=4"') in spare.stdout + spare.stderr
        assert "Traceback" not in spare.stdout + spare.stderr and not (tmp_path / "spare").exists()
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
    # outside the prepared environment Flower would `uv sync` a fresh one (a CUDA torch): uv must refuse at once
    assert config["tool"]["uv"]["managed"] is False


class InMemoryGrid:  # what the app sees of Flower's simulation: node ids only
    def __init__(self, nodes: int):
        self.nodes = nodes

    def get_node_ids(self):
        return list(range(1, self.nodes + 1))


def test_flwr_run_runs_the_demo_under_the_demo_federations_policy_as_securefpt_demo(tmp_path, monkeypatch):
    """`flwr run .`'s default experiment is `securefpt demo`'s: the same policy, clients and audit key
    (the Yoruba institution's region excluded), not the bare packaged config."""
    import tomllib
    from flwr.app import Context, RecordDict

    from securefpt.coordinator.eligibility import participants
    from securefpt.engines import flower_run

    monkeypatch.setenv("SECUREFPT_HOME", str(tmp_path / "home"))
    run_config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"]
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    cfg = flower_run._experiment(context)
    federation = tmp_path / "home" / "demo-federation"
    assert cfg.policy == federation / "policies" / "masakhanews.yaml" and cfg.clients == federation / "clients"
    decisions = {lang: p.decision.included for lang, p in participants(cfg).items()}
    assert decisions["yor"] is False and sum(decisions.values()) == 4


def test_the_app_refuses_in_one_line_outside_the_prepared_environment_and_for_a_spare_node(tmp_path, monkeypatch):
    from flwr.app import Context, RecordDict

    from securefpt.engines import flower_run
    from securefpt.errors import ConfigError, FederationError

    monkeypatch.setenv("SECUREFPT_HOME", str(tmp_path / "home"))
    experiment = ROOT / "server" / "deploy-tiny.yaml"  # four languages
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"experiment": str(experiment), "overrides": ""})
    out = tmp_path / "out"
    monkeypatch.delenv("SECUREFPT_FLWR_SIMULATION", raising=False)  # flwr run . without activating .venv
    with pytest.raises(ConfigError, match="activate"):
        flower_run._prepare(InMemoryGrid(4), context, out)
    monkeypatch.setenv("SECUREFPT_FLWR_SIMULATION", "1")
    monkeypatch.setattr(flower_run, "NODES_START_S", 0.5)
    with pytest.raises(FederationError, match='num-supernodes=4'):
        flower_run._one_node_per_institution(InMemoryGrid(5), 4)
    with pytest.raises(FederationError, match='started 3 virtual nodes'):
        flower_run._prepare(InMemoryGrid(3), context, out)
    assert not out.exists()  # a run directory made for a run that could not start is removed
    flower_run._prepare(InMemoryGrid(4), context, out)
    partitions = json.loads((out / "nodes" / "partitions.json").read_text())
    assert [Path(p).parent.name for p in partitions] == ["eng", "fra", "hau", "swa"]
