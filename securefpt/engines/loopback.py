"""A trial federation on 127.0.0.1: a SuperLink and SuperNodes as separate Flower processes.

What docs/deployment.md does by hand, scripted for the deployment tests and benchmark:
TLS material (certs.py), a demo federation with attested keys, node configurations and
registered SuperNode keys under the deployment policy (keys.py), a SuperLink with node
authentication and a file database, one SuperNode per institution reading its own
node.yaml (its Flower node config names it), and experiments submitted with Flower's
own `flwr run`. Loopback only, from a source checkout (it uses server/ and policies/).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from securefpt.errors import FederationError
from securefpt.operators.certs import make_tls
from securefpt.operators.keys import make_federation

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
EXPERIMENT = ROOT / "server" / "deploy-tiny.yaml"  # the one docs/deployment.md uses
INSTITUTIONS = {"eng": "eng-newsroom", "fra": "fra-agence", "hau": "hau-radio", "swa": "swa-gazeti"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


class Loopback:
    """A test federation's processes: a SuperLink at the coordinator, a SuperNode per institution."""

    def __init__(self, tmp: Path) -> None:
        if shutil.which("flower-superlink", path=str(BIN)) is None:
            raise FederationError(f"flower-superlink is not installed in {BIN}")
        self.tmp = tmp
        home = tmp / "flwr-home"
        home.mkdir()
        # the SuperLink and SuperNodes start flower-superexec / flwr-serverapp by name
        self.env = {**os.environ, "FLWR_HOME": str(home), "PYTHONUNBUFFERED": "1",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.env.pop("SECUREFPT_FAULTS", None)
        self.port = free_port()
        self.tls = make_tls(tmp / "tls")  # a CA and a certificate for 127.0.0.1, made with `cryptography`
        self.federation = tmp / "federation"
        make_federation(self.federation, policy="deployment")  # attested keys, node configurations, SuperNode keys
        self.clients = self.federation / "clients"
        self.overrides = (f"policy={self.federation / 'policies' / 'deployment.yaml'} clients={self.clients} "
                          f"server_key={self.federation / 'coordinator' / 'audit.key'}")
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.tls["ca_cert"]}"\n')
        self.procs: dict[str, subprocess.Popen] = {}

    def _spawn(self, name: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "a")
        proc = subprocess.Popen(args, env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def start_superlink(self) -> None:
        self._spawn("superlink", [
            str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(self.tls["ca_cert"]),
            "--ssl-certfile", str(self.tls["cert"]), "--ssl-keyfile", str(self.tls["key"]),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--database", str(self.tmp / "state.db"), "--host", "127.0.0.1", "--port", str(self.port)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise FederationError("the SuperLink did not listen within 60 s:\n" + self.log("superlink")[-2000:])

    def crash_coordinator(self) -> None:
        """SIGKILL the SuperLink and the SuperExec/ServerApp it started (they run detached)."""
        superlink = self.procs.pop("superlink")
        children = subprocess.run(["pgrep", "-f", f"--parent-pid {superlink.pid}"], capture_output=True, text=True)
        kill_group(superlink)
        for pid in children.stdout.split():
            try:
                os.killpg(os.getpgid(int(pid)), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def register(self, public_key: Path) -> int:
        """`flwr supernode register`: only registered SuperNode keys may join."""
        res = self.flwr("supernode", "register", str(public_key), "loopback", "--format", "json")
        if res.returncode != 0:
            raise FederationError(f"flwr supernode register {public_key} failed: {res.stdout}{res.stderr}")
        return int(json.loads(res.stdout[res.stdout.index("{"):])["node-id"])

    def online(self) -> set[int]:
        res = self.flwr("supernode", "list", "loopback", "--format", "json")
        nodes = json.loads(res.stdout[res.stdout.index("{"):])["nodes"] if "{" in res.stdout else []
        return {int(n["node-id"]) for n in nodes if n["status"] == "online"}

    def wait_online(self, ids: set[int], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ids <= self.online():
                return
            time.sleep(1)
        raise FederationError(f"SuperNodes {sorted(ids - self.online())} not online within {timeout:.0f}s")

    def start_node(self, name: str, node_key: Path, node_config: Path, faults: str = "") -> subprocess.Popen:
        env = {**self.env, "SECUREFPT_FAULTS": faults} if faults else None
        config = f'config="{node_config}" state-dir="{self.tmp / "node-state" / name}"'
        return self._spawn(name, [
            str(BIN / "flower-supernode"), "--root-certificates", str(self.tls["ca_cert"]),
            "--superlink", f"127.0.0.1:{self.port}", "--auth-supernode-private-key", str(node_key),
            "--node-config", config, "--port", str(free_port())], env)

    def start_institutions(self, faults: dict[str, str] | None = None) -> dict[str, int]:
        """Register and start the three institutions' SuperNodes; their Flower node ids by language."""
        ids = {}
        for lang, client in INSTITUTIONS.items():
            ids[lang] = self.register(self.clients / "keys" / f"{client}-node.pub")
            self.start_node(lang, self.clients / "keys" / f"{client}-node.key", self.clients / client / "node.yaml",
                            (faults or {}).get(lang, ""))
        return ids

    def run_args(self, out: Path, overrides: str = "") -> list[str]:
        config = f"experiment='{EXPERIMENT}' out-dir='{out}' overrides='{self.overrides} {overrides}'"
        return [str(BIN / "flwr"), "run", str(ROOT), "loopback", "--stream", "--run-config", config]

    def submit(self, out: Path, overrides: str = "", timeout: float = 480) -> subprocess.CompletedProcess:
        """`flwr run ... --stream` until the run ends; raises unless it wrote summary.json."""
        res = subprocess.run(self.run_args(out, overrides), env=self.env, capture_output=True, text=True,
                             timeout=timeout)
        if not (out / "summary.json").is_file():
            raise FederationError("the deployed run wrote no summary.json:\n" + res.stdout[-3000:] + res.stderr[-3000:])
        return res

    def stop(self) -> None:
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                kill_group(proc)
