"""The trust boundary in the code: import contracts (pyproject.toml, [tool.importlinter]) checked
by import-linter on every test run, so the README's layering sentence cannot drift."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint(root: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(lint), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(root), "PATH": ""})


def test_node_coordinator_wire_learning_and_privacy_keep_their_import_contracts():
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6 kept, 0 broken" in done.stdout


def test_a_node_that_reads_the_operators_experiment_file_breaks_the_contract(tmp_path):
    """A node reads its request from its own records, never the coordinator's experiment file: a node
    module importing the operator's ExperimentConfig fails the check."""
    shutil.copytree(ROOT / "securefpt", tmp_path / "securefpt", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    personal = tmp_path / "securefpt" / "node" / "personal.py"
    personal.write_text(personal.read_text() + "\nfrom securefpt.experiment.loading import load_config  # noqa\n")
    done = _lint(tmp_path)
    assert done.returncode != 0 and "nor the operator's experiment file BROKEN" in " ".join(done.stdout.split())


def test_a_node_module_that_imports_the_coordinator_breaks_the_contract(tmp_path):
    """The control: the same check on a copy where a node's guard imports coordinator code fails."""
    shutil.copytree(ROOT / "securefpt", tmp_path / "securefpt", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    guards = tmp_path / "securefpt" / "node" / "guards.py"
    guards.write_text(guards.read_text() + "\nfrom securefpt.coordinator.aggregation import weighted_average  # noqa\n")
    done = _lint(tmp_path)
    assert done.returncode != 0
    assert "a node (node/) never imports coordinator" in done.stdout and "BROKEN" in done.stdout
    assert "securefpt.node.guards -> securefpt.coordinator.aggregation" in done.stdout


def test_the_node_the_wire_and_the_experiment_file_type_check():
    """mypy ([tool.mypy], with pydantic's plugin) finds no error in node/, protocol/ and experiment/."""
    mypy = Path(sys.executable).with_name("mypy")
    done = subprocess.run([str(mypy), "securefpt/node", "securefpt/protocol", "securefpt/experiment"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "Success: no issues found" in done.stdout, done.stdout + done.stderr


def test_the_code_is_ruff_clean():
    """The house rules ([tool.ruff] in pyproject.toml) hold for the package, its tests and benchmarks."""
    ruff = Path(sys.executable).with_name("ruff")
    done = subprocess.run([str(ruff), "check", "--no-cache", "securefpt", "tests", "bench"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
