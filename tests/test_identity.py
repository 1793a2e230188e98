"""A node's identity bound to its region attestation: proof of possession of the attested key."""

import shutil
from pathlib import Path

import pytest
import yaml

from securefpt.attestation import load_private, load_public, new_key, save_private
from securefpt.audit import read_entries, verify_log
from securefpt.config import load_config
from securefpt.identity import check_proof, new_challenge, prove
from securefpt.keys import make_federation
from securefpt.policy import load_manifests, load_policy
from securefpt.simulation import run_federated_simulation

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def federation(tmp_path):
    """The demo federation, made fresh (with private keys), under the deployment policy."""
    make_federation(tmp_path / "clients", tmp_path / "clients" / "keys")
    (tmp_path / "policies").mkdir()
    shutil.copy(ROOT / "policies" / "deployment.yaml", tmp_path / "policies")
    return tmp_path


def test_the_deployment_policy_requires_key_proof_and_admits_the_tiny_experiment(federation):
    policy = load_policy(federation / "policies" / "deployment.yaml")
    assert policy.server.require_key_proof is True
    assert load_policy(ROOT / "policies" / "masakhanews.yaml").server.require_key_proof is False


def test_node_keys_are_the_p384_openssh_keys_flower_authenticates_with(federation):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
    from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

    keys = federation / "clients" / "keys"
    private = load_ssh_private_key((keys / "eng-newsroom-node.key").read_bytes(), None)
    public = load_ssh_public_key((keys / "eng-newsroom-node.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert public.public_numbers() == private.public_key().public_numbers() and uses_nist_ec_curve(public)
    assert (keys / "eng-newsroom-node.key").stat().st_mode & 0o077 == 0  # private: owner only


def test_a_proof_holds_only_for_its_key_node_run_and_challenge(federation):
    manifests = load_manifests(federation / "clients")
    eng = manifests["eng-newsroom"]
    assert eng.key is not None and eng.key.is_file()  # the manifest names its key, beside it
    key, nonce = load_private(eng.key), new_challenge()
    proof = prove(key, run_id=7, node_id=42, nonce=nonce, client_id="eng-newsroom")
    assert check_proof(eng, "eng-newsroom", proof, 7, 42, nonce, required=True) is None
    # another node replaying it, another run, another challenge: refused
    assert "without its private key" in check_proof(eng, "eng-newsroom", proof, 7, 43, nonce, True)
    assert "without its private key" in check_proof(eng, "eng-newsroom", proof, 8, 42, nonce, True)
    assert "without its private key" in check_proof(eng, "eng-newsroom", proof, 7, 42, new_challenge(), True)
    # a node that copied eng's attestation but signs with its own key
    forged = prove(new_key(), 7, 42, nonce, "eng-newsroom")
    assert "attestation of 'eng-newsroom' without its private key" in check_proof(eng, "eng-newsroom", forged, 7, 42,
                                                                                   nonce, True)
    # another institution's key signing for eng: still not eng
    fra_key = load_private(manifests["fra-agence"].key)
    assert check_proof(eng, "eng-newsroom", prove(fra_key, 7, 42, nonce, "eng-newsroom"), 7, 42, nonce, True)
    # claiming another client for the language, or no proof where one is required
    assert "claims client 'fra-agence'" in check_proof(eng, "fra-agence", proof, 7, 42, nonce, True)
    assert "no proof" in check_proof(eng, "", "", 7, 42, nonce, required=True)
    assert check_proof(eng, "", "", 7, 42, nonce, required=False) is None
    assert "malformed" in check_proof(eng, "eng-newsroom", "not base64!", 7, 42, nonce, True)


@pytest.mark.slow
def test_a_node_holding_another_key_than_its_attestation_names_is_excluded_with_the_reason(
        federation, tmp_path):
    # eng's node keeps eng's manifest (attestation), but holds a different private key
    manifest_path = federation / "clients" / "eng-newsroom.yaml"
    manifest = yaml.safe_load(manifest_path.read_text())
    save_private(new_key(), federation / "clients" / "keys" / "impostor.key")
    manifest["key"] = "keys/impostor.key"
    manifest_path.write_text(yaml.safe_dump(manifest))
    cfg = load_config(ROOT / "server" / "deploy-tiny.yaml",
                      [f"policy={federation / 'policies' / 'deployment.yaml'}", f"clients={federation / 'clients'}"])
    summary = run_federated_simulation(cfg, tmp_path / "run", show_progress=False)

    eng = summary["clients"]["eng-newsroom"]
    assert eng["included"] is False
    assert eng["reason"].startswith("identity refused: presented the attestation of 'eng-newsroom' without")
    assert summary["clients"]["fra-agence"]["included"] and summary["clients"]["hau-radio"]["included"]
    assert all(r["participants"] == ["fra", "hau"] for r in summary["rounds"])
    entries = read_entries(summary["audit_log"])
    identity = {e["language"]: e for e in entries if e["event"] == "identity"}
    assert identity["eng"]["accepted"] is False and "without its private key" in identity["eng"]["reason"]
    assert identity["fra"]["accepted"] and identity["fra"]["client"] == "fra-agence"
    assert len({e["node"] for e in identity.values()}) == 3  # each decision names the node it concerns
    assert verify_log(summary["audit_log"], load_public(summary["audit_public_key"])).ok
