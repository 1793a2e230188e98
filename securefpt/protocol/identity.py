"""Binding a node to its region attestation: proof of possession of the attested key.

Flower's SuperNode authentication lets only registered node keys join, and stamps
each reply with the node id it authenticated. An attestation is a public document,
though: a registered node could copy another institution's manifest. So at setup the
server sends a fresh challenge, and the node signs

    {purpose, run_id, node_id, nonce, client_id}

with the Ed25519 private key that its attestation names. The server checks the
signature with the attested public key, for the node id that Flower authenticated:
a node that presents another node's attestation cannot sign, and a valid proof cannot
be replayed by another node, in another run, or for another challenge.
"""

from __future__ import annotations

import os
from typing import Optional

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from securefpt.protocol.attestation import b64, canonical, unb64, verify
from securefpt.protocol.policy import ClientManifest

PURPOSE = "securefpt node binding v1"


def new_challenge() -> str:
    return b64(os.urandom(32))


def binding_payload(run_id: int, node_id: int, nonce: str, client_id: str) -> bytes:
    return canonical({"purpose": PURPOSE, "run_id": int(run_id), "node_id": int(node_id), "nonce": nonce,
                      "client_id": client_id})


def prove(key: Ed25519PrivateKey, run_id: int, node_id: int, nonce: str, client_id: str) -> str:
    """The node's answer to a challenge (base64 signature)."""
    return b64(key.sign(binding_payload(run_id, node_id, nonce, client_id)))


def check_proof(registered: ClientManifest, claimed_client: str, proof: Optional[str], run_id: int, node_id: int,
                nonce: str, required: bool) -> Optional[str]:
    """Why this node may not act as `registered`, or None when it may."""
    if claimed_client and claimed_client != registered.client_id:
        return f"node claims client '{claimed_client}', but '{registered.client_id}' is registered for its language"
    if not proof:
        return "no proof of possession of the attested key" if required else None
    att = registered.attestation
    if att is None:
        return f"client '{registered.client_id}' has no attestation to prove"
    try:
        public = Ed25519PublicKey.from_public_bytes(unb64(att.client_public_key))
        signature = unb64(proof)
    except ValueError:
        return "malformed key or proof"
    if not verify(public, signature, binding_payload(run_id, node_id, nonce, registered.client_id)):
        return (f"presented the attestation of '{registered.client_id}' without its private key "
                "(challenge signature does not verify)")
    return None
