"""Flower's deployment engine on loopback: a SuperLink and three SuperNodes as separate processes, over TLS.

Bounded in time, 127.0.0.1 only. Runs the same ServerApp/ClientApp as the simulation
engine, submitted with Flower's own `flwr run`, and compares the result with the
simulation engine's for the same seed.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from securefpt.certs import make_tls
from securefpt.config import load_config
from securefpt.results import load_arrays
from securefpt.secure_aggregation import resolve_settings
from securefpt.simulation import run_federated_simulation

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

EXPERIMENT = ROOT / "server" / "deploy-tiny.yaml"  # the one docs/deployment.md uses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def federation(tmp_path):
    if shutil.which("flower-superlink", path=str(BIN)) is None:
        pytest.skip("flower-superlink is not installed beside this Python")
    home = tmp_path / "flwr-home"
    home.mkdir()
    # the SuperLink and SuperNodes start flower-superexec / flwr-serverapp by name
    env = {**os.environ, "FLWR_HOME": str(home), "PYTHONUNBUFFERED": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    port = free_port()
    tls = make_tls(tmp_path / "tls")  # a CA and a certificate for 127.0.0.1, made with `cryptography`
    procs = [subprocess.Popen(
        [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(tls["ca_cert"]), "--ssl-certfile", str(tls["cert"]),
         "--ssl-keyfile", str(tls["key"]), "--disable-runtime-dependency-installation",
         "--database", str(tmp_path / "state.db"), "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=open(tmp_path / "superlink.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)]
    time.sleep(4)
    for lang in ("eng", "fra", "hau"):
        procs.append(subprocess.Popen(
            [str(BIN / "flower-supernode"), "--root-certificates", str(tls["ca_cert"]), "--superlink", f"127.0.0.1:{port}",
             "--node-config", f'language="{lang}"', "--port", str(free_port())],
            env=env, stdout=open(tmp_path / f"supernode-{lang}.log", "w"), stderr=subprocess.STDOUT,
            start_new_session=True))
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{tls["ca_cert"]}"\n')
    yield env, tmp_path
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def test_a_secure_run_on_the_deployment_engine_equals_the_simulation(federation):
    env, tmp = federation
    experiment = EXPERIMENT
    out = tmp / "deployed"
    res = subprocess.run(
        [str(BIN / "flwr"), "run", str(ROOT), "loopback", "--stream",
         "--run-config", f"experiment='{experiment}' out-dir='{out}'"],
        env=env, capture_output=True, text=True, timeout=480)
    assert (out / "summary.json").is_file(), res.stdout[-3000:] + res.stderr[-3000:]

    cfg = load_config(experiment)
    simulated = run_federated_simulation(cfg, tmp / "simulated", show_progress=False)
    deployed = load_arrays(out / "prompt_encoder.safetensors")
    reference = load_arrays(tmp / "simulated" / "prompt_encoder.safetensors")
    bound = resolve_settings(cfg, 3).error_bound(cohort=3, total_ratio=3.0)  # |D_k| = max_weight = 12
    for name in reference:
        assert np.abs(deployed[name] - reference[name]).max() <= 2 * bound + 1e-6, name  # two rounds
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["secure_aggregation"]["aborted_rounds"] == []
    assert [r["participants"] for r in summary["rounds"]] == [["eng", "fra", "hau"]] * 2
    assert summary["final"]["accuracy"] == simulated["final"]["accuracy"]
