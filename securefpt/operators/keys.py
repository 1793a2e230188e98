"""A federation's keys and files, made for trials (`securefpt keys demo`).

Real deployments bring their own authorities; this creates a complete demo federation
so that policies, attestations, node configurations, node authentication and the audit
log can be exercised end to end. Under one folder, in the repository's own layout
(so the committed `clients/` and `policies/` read the same way):

    policies/<policy>.yaml          the federation's policy (copied), with its pinned audit key
    coordinator/audit.key           the coordinator's long-lived audit key (private)
    clients/keys/                   public keys; the private ones are each party's own:
        <region>-authority.key/.pub     a region authority's key (it signs attestations)
        coordinator-audit.pub           the coordinator's audit key, pinned in the policy
        <id>.key/.pub                   an institution's attested Ed25519 key
        <id>-node.key/.pub              its P-384 SuperNode key, registered with the SuperLink
    clients/<id>/manifest.yaml      what the institution registers (public)
    clients/<id>/node.yaml          its node's own configuration (securefpt/node/config.py)

Nothing is overwritten unless asked: private keys are never replaced silently.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securefpt.errors import ConfigError
from securefpt.protocol.attestation import issue, new_key, public_raw, save_private, save_public

REPO = Path(__file__).resolve().parents[2]  # a source checkout (policies/ lives there)

# (client id, region, language, where its data lives) of the MasakhaNEWS demo federation
DEMO_FEDERATION = [
    ("eng-newsroom", "uk", "eng", "uk: newsroom archive"),
    ("fra-agence", "eu-west", "fra", "eu-west: agency archive"),
    ("hau-radio", "ng-north", "hau", "ng-north: broadcaster archive"),
    ("swa-gazeti", "ke", "swa", "ke: newspaper archive"),
    ("yor-iroyin", "ng-south", "yor", "ng-south: newspaper archive"),
]
LIFETIME_EPSILON = 16.0  # each demo institution's budget per dataset, over every experiment


def make_node_key(stem: Path) -> tuple[Path, Path]:
    """A SuperNode authentication key pair: `<stem>.key` (private) and `<stem>.pub` (to register)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = stem.with_name(stem.name + ".key"), stem.with_name(stem.name + ".pub")
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


def node_configuration(client_id: str, policy_file: str, task: str = "news-topic") -> dict:
    """An institution's node.yaml for the demo data (its own copy of the policy, its own key)."""
    return {"manifest": "manifest.yaml", "key": f"../keys/{client_id}.key", "policy": f"../../policies/{policy_file}",
            "data": {task: {"source": "demo"}}, "budget": {"epsilon": LIFETIME_EPSILON, "delta": 1e-5}}


def make_federation(root: Path, policy: str | Path = "masakhanews", members=DEMO_FEDERATION,
                    expires: datetime = datetime(2031, 1, 1, tzinfo=timezone.utc), force: bool = False) -> list[Path]:
    """Write a complete demo federation under `root` (see the module docstring); the node configurations.
    `policy` names one of the checkout's policies/*.yaml, or is the path of a policy file whose key
    paths follow the same layout (`../clients/keys/...`)."""
    root = Path(root)
    template = Path(policy) if isinstance(policy, Path) else REPO / "policies" / f"{policy}.yaml"
    if not template.is_file():
        raise ConfigError(f"{template}: no such policy")
    keys = root / "clients" / "keys"
    if not force:
        existing = [p for p in (root / "coordinator" / "audit.key", *keys.glob("*.key")) if p.exists()]
        if existing:
            raise ConfigError(f"{existing[0]}: a private key is already there; use --force to replace the "
                              "federation's keys (every attestation and node key changes)")
    (root / "policies").mkdir(parents=True, exist_ok=True)
    shutil.copy(template, root / "policies" / template.name)
    coordinator = new_key()
    save_private(coordinator, root / "coordinator" / "audit.key")
    save_public(coordinator, keys / "coordinator-audit.pub")
    authorities = {}
    for region in sorted({region for _, region, _, _ in members}):
        authorities[region] = new_key()
        save_private(authorities[region], keys / f"{region}-authority.key")
        save_public(authorities[region], keys / f"{region}-authority.pub")
    written = []
    for client_id, region, language, location in members:
        client = new_key()
        save_private(client, keys / f"{client_id}.key")
        save_public(client, keys / f"{client_id}.pub")
        make_node_key(keys / f"{client_id}-node")
        att = issue(authorities[region], client_id, region, language, public_raw(client), expires)
        home = root / "clients" / client_id
        home.mkdir(parents=True, exist_ok=True)
        manifest = {"client_id": client_id, "region": region, "language": language, "data_location": location,
                    "attestation": att.to_dict()}
        (home / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True),
                                            encoding="utf-8")
        (home / "node.yaml").write_text(
            f"# {client_id}'s node configuration: read by its own node only (securefpt/node/config.py)\n"
            + yaml.safe_dump(node_configuration(client_id, template.name), sort_keys=False), encoding="utf-8")
        written.append(home / "node.yaml")
    return written
