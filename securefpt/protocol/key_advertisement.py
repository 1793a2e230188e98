"""What SecAgg+ peers sign (Bonawitz et al. 2017, actively secure variant).

- A key advertisement: each node signs the two SecAgg+ public keys it advertises, bound
  to the run, the round, its Flower node id and its client id, with its attested key.
  A peer verifies the signature with the key the signer's attestation names, and the
  attestation with the authority its own trust store holds for the signer's region, so
  the coordinator can neither substitute keys nor invent peers.
- A survivor set: before revealing any share, each node signs the set of surviving nodes
  it was told, and reveals only when enough peers signed the same set, so the coordinator
  cannot tell some nodes that a node survived and others that it dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from securefpt.errors import ConfigError
from securefpt.protocol.attestation import Attestation, attested_key, b64, canonical, check_attestation, unb64, verify

KEYS_PURPOSE = "securefpt secagg key advertisement v1"
SURVIVORS_PURPOSE = "securefpt secagg survivors v1"


def keys_payload(run_id: int, server_round: int, node_id: int, client_id: str, pk1: bytes, pk2: bytes) -> bytes:
    return canonical({"purpose": KEYS_PURPOSE, "run_id": int(run_id), "round": int(server_round),
                      "node_id": int(node_id), "client_id": client_id, "pk1": b64(pk1), "pk2": b64(pk2)})


def survivors_payload(run_id: int, server_round: int, survivors: list[int]) -> bytes:
    return canonical({"purpose": SURVIVORS_PURPOSE, "run_id": int(run_id), "round": int(server_round),
                      "survivors": sorted(int(n) for n in survivors)})


def advertise(key: Ed25519PrivateKey, attestation: Attestation, run_id: int, server_round: int, node_id: int,
              pk1: bytes, pk2: bytes) -> str:
    """A node's signed advertisement of its SecAgg+ keys (JSON, relayed by the coordinator)."""
    signature = key.sign(keys_payload(run_id, server_round, node_id, attestation.client_id, pk1, pk2))
    return json.dumps({"attestation": attestation.to_dict(), "signature": b64(signature)}, sort_keys=True)


@dataclass(frozen=True)
class Peer:
    client_id: str
    public_key: Ed25519PublicKey  # its attested key, which signs its survivor set too


def check_advertisement(text: Optional[str], run_id: int, server_round: int, node_id: int, pk1: bytes, pk2: bytes,
                        authorities: dict[str, Ed25519PublicKey], now: Optional[datetime] = None) -> Peer:
    """The verified peer behind an advertisement; ValueError with the reason otherwise."""
    if not text:
        raise ValueError(f"node {node_id}: no signed key advertisement")
    try:
        data = json.loads(text)
        att = Attestation(**data["attestation"])
        signature = unb64(data["signature"])
        public = attested_key(att)
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise ValueError(f"node {node_id}: malformed key advertisement ({type(exc).__name__})") from None
    why = check_attestation(att, att.client_id, att.region, authorities.get(att.region),
                            now or datetime.now(timezone.utc), att.language)
    if why is not None:
        raise ValueError(f"node {node_id}: {why}")
    if not verify(public, signature, keys_payload(run_id, server_round, node_id, att.client_id, pk1, pk2)):
        raise ValueError(f"node {node_id}: the advertised keys are not the ones '{att.client_id}' signed")
    return Peer(att.client_id, public)


def sign_survivors(key: Ed25519PrivateKey, run_id: int, server_round: int, survivors: list[int]) -> str:
    return b64(key.sign(survivors_payload(run_id, server_round, survivors)))


def count_agreeing(signatures: dict[int, str], peers: dict[int, Peer], run_id: int, server_round: int,
                   survivors: list[int]) -> int:
    """How many known peers signed this very survivor set."""
    payload = survivors_payload(run_id, server_round, survivors)
    agreeing = 0
    for node_id, signature in signatures.items():
        peer = peers.get(node_id)
        try:
            if peer is not None and verify(peer.public_key, unb64(signature), payload):
                agreeing += 1
        except ValueError:
            continue
    return agreeing
