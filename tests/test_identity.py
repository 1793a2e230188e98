"""A node's identity bound to its region attestation: proof of possession of the attested key."""

from pathlib import Path

import pytest
import yaml
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from securefpt.engines.simulation import run_federated_simulation
from securefpt.errors import ConfigError
from securefpt.experiment.loading import load_config
from securefpt.node import app as node_app
from securefpt.node.config import load_node, this_node
from securefpt.operators.keys import make_federation
from securefpt.protocol import records as R
from securefpt.protocol.attestation import load_private, new_key, save_private
from securefpt.protocol.audit import read_entries
from securefpt.protocol.identity import check_proof, new_challenge, prove
from securefpt.protocol.policy import load_manifests, load_policy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def federation(tmp_path):
    """The demo federation, made fresh (with private keys), under the deployment policy."""
    make_federation(tmp_path / "fed", policy="deployment")
    return tmp_path / "fed"


def test_every_shipped_policy_requires_key_proof():
    for name in ("deployment", "masakhanews"):
        assert load_policy(ROOT / "policies" / f"{name}.yaml").server.require_key_proof is True


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
    keys = federation / "clients" / "keys"
    eng = manifests["eng-newsroom"]
    key, nonce = load_private(keys / "eng-newsroom.key"), new_challenge()
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
    fra_key = load_private(keys / "fra-agence.key")
    assert check_proof(eng, "eng-newsroom", prove(fra_key, 7, 42, nonce, "eng-newsroom"), 7, 42, nonce, True)
    # claiming another client, or no proof where one is required
    assert "claims client 'fra-agence'" in check_proof(eng, "fra-agence", proof, 7, 42, nonce, True)
    assert "no proof" in check_proof(eng, "", "", 7, 42, nonce, required=True)
    assert check_proof(eng, "", "", 7, 42, nonce, required=False) is None
    assert "malformed" in check_proof(eng, "eng-newsroom", "not base64!", 7, 42, nonce, True)


def test_a_node_configured_with_a_key_its_attestation_does_not_name_refuses_to_start(federation, tmp_path):
    path = federation / "clients" / "eng-newsroom" / "node.yaml"
    config = yaml.safe_load(path.read_text())
    save_private(new_key(), federation / "clients" / "keys" / "other.key")
    config["key"] = "../keys/other.key"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="own identity does not verify: the key is not the one"):
        load_node(path, state_base=tmp_path)


def impostor_app() -> ClientApp:
    """Every node runs securefpt's ClientApp, except the one configured with `honest_partition_of`'s
    node.yaml (a second copy of fra's node): it answers setup claiming to be eng-newsroom, with a
    proof signed by fra's key. A misbehaving node, as a modified ClientApp would be."""
    app = ClientApp(mods=node_app.app._mods)

    @app.query()
    def setup(msg: Message, context: Context) -> Message:
        reply = node_app.setup(msg, context)
        if context.node_config["partition-id"] == 3:
            node = this_node(context)
            challenge = str(msg.content.config_records[R.SETUP]["challenge"])
            reply.content.config_records[R.IDENTITY] = ConfigRecord({
                "client-id": "eng-newsroom", "language": "eng",
                "proof": prove(node.key, context.run_id, context.node_id, challenge, "eng-newsroom")})
        return reply

    app.train()(node_app.train)
    app.evaluate()(node_app.evaluate)
    return app


@pytest.mark.slow
def test_a_node_claiming_another_institution_is_refused_and_cannot_shut_it_out(federation, tmp_path):
    cfg = load_config(ROOT / "server" / "deploy-tiny.yaml",
                      [f"policy={federation / 'policies' / 'deployment.yaml'}", f"clients={federation / 'clients'}",
                       f"server_key={federation / 'coordinator' / 'audit.key'}"])
    clients = federation / "clients"
    nodes = [clients / c / "node.yaml" for c in ("eng-newsroom", "fra-agence", "hau-radio", "fra-agence")]
    summary = run_federated_simulation(cfg, tmp_path / "run", show_progress=False, nodes=nodes,
                                       client_app=impostor_app())
    # whatever the node ids' order, the impostor did not take eng's place
    assert all(summary["clients"][c]["included"] for c in ("eng-newsroom", "fra-agence", "hau-radio"))
    assert all(r["participants"] == ["eng", "fra", "hau"] for r in summary["rounds"])
    identity = [e for e in read_entries(summary["audit_log"]) if e["event"] == "identity"]
    assert len(identity) == 4 and len({e["node"] for e in identity}) == 4  # each decision names its node
    refused = [e for e in identity if not e["accepted"]]
    assert len(refused) == 1 and refused[0]["client"] == "eng-newsroom"
    assert "attestation of 'eng-newsroom' without its private key" in refused[0]["reason"]


def test_a_peer_whose_attestation_expired_on_the_nodes_own_clock_is_refused_in_secagg():
    """Threat model item 12: a hostile coordinator relays a SecAgg+ key advertisement from a peer whose
    attestation the authority really signed but which has expired. The node checks the expiry against
    its own clock (nothing in the message sets the time): refused; the same peer while attested passes."""
    from datetime import datetime, timedelta, timezone

    from securefpt.protocol.attestation import issue, public_raw
    from securefpt.protocol.key_advertisement import advertise, check_advertisement

    authority, peer = new_key(), new_key()
    now = datetime.now(timezone.utc)
    pk1, pk2 = b"\x01" * 32, b"\x02" * 32
    for expires, refused in ((now - timedelta(seconds=1), True), (now + timedelta(days=1), False)):
        att = issue(authority, "eng-newsroom", "uk", "eng", public_raw(peer), expires)
        text = advertise(peer, att, run_id=7, server_round=1, node_id=42, pk1=pk1, pk2=pk2)
        if refused:
            with pytest.raises(ValueError, match="attestation expired"):
                check_advertisement(text, 7, 1, 42, pk1, pk2, {"uk": authority.public_key()})
        else:
            assert check_advertisement(text, 7, 1, 42, pk1, pk2, {"uk": authority.public_key()}).client_id \
                == "eng-newsroom"
    # an attestation that lapses during a run: refused from then on (the node reads its own clock each round)
    with pytest.raises(ValueError, match="attestation expired"):
        check_advertisement(text, 7, 1, 42, pk1, pk2, {"uk": authority.public_key()}, now=now + timedelta(days=2))


def test_a_nodes_budget_is_shared_out_by_the_coordinator_key_its_own_policy_pins(federation):
    """The federation a spend is charged to (budget.per_federation) is the node's own pinned coordinator
    key, never a name the coordinator sends; a node outside a federation is "local"."""
    import hashlib

    from securefpt.protocol.attestation import load_public, public_raw

    node = load_node(federation / "clients" / "eng-newsroom" / "node.yaml", state_base=Path("unused"))
    pinned = load_public(federation / "clients" / "keys" / "coordinator-audit.pub")
    assert node.federation == hashlib.sha256(public_raw(pinned)).hexdigest()[:16]
