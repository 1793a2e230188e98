"""The command line as a user meets it: real subprocesses, exit codes, one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY, expected_predictions, make_masakhanews_like, tsv_cfg_overrides

ROOT = Path(__file__).resolve().parents[1]


def securefpt(*args, cwd=None, home=None):
    # wide enough that no line wraps, whatever the length of the temporary paths in it
    env = {**os.environ, "COLUMNS": "1000", **({"SECUREFPT_HOME": str(home)} if home else {})}
    return subprocess.run([sys.executable, "-m", "securefpt.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600, env=env)


def one_line(stderr: str) -> str:
    lines = [x for x in stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_bad_config_exits_non_zero_with_one_line(tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("fl:\n  rounds: 0\n")
    res = securefpt("run", str(cfg), "--out", str(tmp_path / "out"))
    assert res.returncode == 2
    line = one_line(res.stderr)
    assert "fl.rounds" in line and str(cfg) in line


def test_missing_config_and_missing_data(tmp_path):
    res = securefpt("run", str(tmp_path / "none.yaml"))
    assert res.returncode == 2 and "not found" in one_line(res.stderr)
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"data:\n  source: masakhanews_tsv\n  root: {tmp_path / 'absent'}\n  languages: [eng]\n")
    res = securefpt("run", str(cfg), "--set", "paradigm=centralized", *[f"--set={x}" for x in TINY])
    assert res.returncode == 2 and "eng/train.tsv: file not found" in one_line(res.stderr)
    # federated: the trial nodes' files are written in the run directory, which is removed: not named
    out = tmp_path / "fed"
    res = securefpt("run", str(cfg), "--out", str(out), "--set", "data.labels=[business,sports]",
                    *[f"--set={x}" for x in TINY])
    line = one_line(res.stderr)
    assert res.returncode == 2 and line.startswith("error: data (eng): ") and "eng/train.tsv: file not found" in line
    assert str(out) not in line and not out.exists()


@pytest.fixture(scope="module")
def trial_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-data")
    return make_masakhanews_like(root / "data", ["aa", "bb"])


def test_run_then_predict_uses_the_trained_artifact(tmp_path, trial_data):
    out = tmp_path / "run"
    sets = [f"--set={x}" for x in TINY + tsv_cfg_overrides(trial_data, ["aa", "bb"])
            + ["paradigm=centralized", "fl.rounds=3", "fl.lr=0.3"]]
    res = securefpt("run", str(ROOT / "server" / "masakhanews.yaml"), "--out", str(out), "--quiet", *sets)
    assert res.returncode == 0, res.stderr
    assert "avg" in res.stdout
    texts = ["match goal coach 3", "vote election minister 4", "hospital vaccine"]
    res = securefpt("predict", str(out), *texts)
    assert res.returncode == 0, res.stderr
    got = [line.split("\t") for line in res.stdout.strip().splitlines()]
    trained, untrained = expected_predictions(out, texts)
    assert [(label, float(prob)) for label, prob, _ in got] == [(label, pytest.approx(p, abs=1e-3))
                                                                for label, p in trained]
    assert [p for _, p in trained] != pytest.approx([p for _, p in untrained], abs=1e-3)


def test_predict_for_one_language_of_a_monolingual_run(tmp_path, trial_data):
    out = tmp_path / "run"
    sets = [f"--set={x}" for x in TINY + tsv_cfg_overrides(trial_data, ["aa", "bb"]) + ["paradigm=monolingual"]]
    assert securefpt("run", str(ROOT / "server" / "masakhanews.yaml"), "--out", str(out), "--quiet",
                     *sets).returncode == 0
    res = securefpt("predict", str(out), "--language", "bb", "vote election minister")
    assert res.returncode == 0, res.stderr
    label, prob, _ = res.stdout.strip().split("\t")
    [(want, p)], _ = expected_predictions(out, ["vote election minister"], "languages/bb/prompt_encoder.safetensors")
    assert label == want and float(prob) == pytest.approx(p, abs=1e-3)
    res = securefpt("predict", str(out), "hello")  # which language's model? the error says how to choose
    assert res.returncode == 2 and "pass --language" in one_line(res.stderr)


def test_predict_on_a_folder_that_is_not_a_run(tmp_path):
    res = securefpt("predict", str(tmp_path), "hello")
    assert res.returncode == 2 and "not a run directory" in one_line(res.stderr)


@pytest.mark.slow
def test_the_default_demo_is_federated_private_secure_and_witnessed(tmp_path):
    """`securefpt demo` itself (tiny model, two rounds): the demo federation, DP, SecAgg+, the policy."""
    home, out = tmp_path / "home", tmp_path / "runs" / "demo"
    sets = [f"--set={x}" for x in TINY]
    res = securefpt("demo", "--out", str(out), "--quiet", *sets, home=home)
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["secure_aggregation"]["enabled"] and summary["secure_aggregation"]["aborted_rounds"] == []
    assert summary["privacy"]["enabled"] and summary["privacy"]["accountant"] == "prv"
    released = summary["privacy"]["epsilon"]
    assert released["yor"] is None and all(0 < released[lang] <= 8.0 for lang in ("eng", "fra", "hau", "swa"))
    assert summary["clients"]["yor-iroyin"]["included"] is False
    assert "excluded yor-iroyin" in res.stdout and "destination not allowed" in res.stdout
    assert [r["participants"] for r in summary["rounds"]] == [["eng", "fra", "hau", "swa"]] * 2
    # an institution verifies the log with its own copy of the policy and the nodes' witness records
    policy = home / "demo-federation" / "policies" / "masakhanews.yaml"
    res = securefpt("audit", "verify", str(out / "audit.jsonl"), "--policy", str(policy), "--witness",
                    str(out / "nodes"), home=home)
    assert res.returncode == 0 and "4 witnesses agree" in res.stdout, res.stdout + res.stderr
    res = securefpt("audit", "report", str(out / "audit.jsonl"))
    assert res.returncode == 0 and "excluded yor-iroyin" in res.stdout and "in region eu-west" in res.stdout
    rows = [line for line in res.stdout.splitlines() if line.startswith("│ 1 ") or line.startswith("│ 2 ")]
    assert len(rows) == 2
    # the node's own report: what it spent, which the coordinator only saw rounded
    res = securefpt("node", "report", str(home / "demo-federation" / "clients" / "hau-radio" / "node.yaml"),
                    "--state", str(out / "nodes" / "hau-radio"))
    assert res.returncode == 0 and "dataset news-topic: lifetime epsilon" in res.stdout and "2 rounds" in res.stdout
    # without --state: the node.yaml names none, the engine gave it RUN/nodes/<client id>, found under runs/
    hau = str(home / "demo-federation" / "clients" / "hau-radio" / "node.yaml")
    res = securefpt("node", "report", hau, cwd=tmp_path)
    assert res.returncode == 0 and "state in runs/demo/nodes/hau-radio" in res.stdout, res.stdout + res.stderr
    res = securefpt("node", "report", hau, cwd=home)
    assert res.returncode == 2 and "no run under runs/ holds its state" in one_line(res.stderr)


def test_policy_explain_lists_every_institution_and_why_not(tmp_path):
    res = securefpt("policy", "explain", str(ROOT / "policies" / "masakhanews.yaml"), "--clients",
                    str(ROOT / "clients"), "--set", "dp.enabled=true")
    assert res.returncode == 0, res.stderr
    for client in ("eng-newsroom", "fra-agence", "hau-radio", "swa-gazeti", "yor-iroyin"):
        assert client in res.stdout
    assert "destination not allowed" in res.stdout
    res = securefpt("policy", "explain", str(ROOT / "policies" / "masakhanews.yaml"), "--clients",
                    str(ROOT / "clients"))  # without DP, ng-north's rule excludes hau-radio
    assert "requires differential privacy" in res.stdout


def test_keys_demo_writes_a_federation_and_never_overwrites_keys_silently(tmp_path):
    res = securefpt("keys", "demo", str(tmp_path / "fed"))
    assert res.returncode == 0, res.stderr
    node = tmp_path / "fed" / "clients" / "eng-newsroom" / "node.yaml"
    assert node.is_file() and (tmp_path / "fed" / "coordinator" / "audit.key").is_file()
    key = (tmp_path / "fed" / "clients" / "keys" / "eng-newsroom.key").read_bytes()
    res = securefpt("keys", "demo", str(tmp_path / "fed"))
    assert res.returncode == 2 and "--force" in one_line(res.stderr)
    assert (tmp_path / "fed" / "clients" / "keys" / "eng-newsroom.key").read_bytes() == key
    assert securefpt("keys", "demo", str(tmp_path / "fed"), "--force").returncode == 0
    assert (tmp_path / "fed" / "clients" / "keys" / "eng-newsroom.key").read_bytes() != key


def test_certs_make_a_ca_and_a_superlink_certificate_it_signed(tmp_path):
    from cryptography import x509

    res = securefpt("certs", str(tmp_path / "tls"))
    assert res.returncode == 0, res.stderr
    ca = x509.load_pem_x509_certificate((tmp_path / "tls" / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "tls" / "server.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert (tmp_path / "tls" / "server.key").stat().st_mode & 0o077 == 0


def test_the_table_prints_a_rounded_release_as_released():
    from securefpt.engines.report import released

    assert [released(v) for v in (0.2, 0.72, 0.7166666, 1.0)] == ["0.2", "0.72", "0.717", "1.0"]
