"""Keys for a federation: region authorities, clients, attestations, node keys (`securefpt keys`).

Real deployments bring their own authorities; this creates a complete demo federation
so that policies, attestations, node authentication and the audit log can be exercised
end to end. Each institution gets two key pairs:
- an Ed25519 client key, which its region's authority attests (attestation.py) and
  with which its node proves that identity at setup (identity.py);
- a NIST P-384 SuperNode key in OpenSSH format, which the coordinator registers with
  `flwr supernode register` so that only that node may join (Flower's node authentication).
"""

from __future__ import annotations

from datetime import datetime, timezone
import os
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securefpt.attestation import issue, new_key, public_raw, save_private, save_public

# (client id, region, language, where its data lives) of the MasakhaNEWS demo federation
DEMO_FEDERATION = [
    ("eng-newsroom", "uk", "eng", "uk: newsroom archive"),
    ("fra-agence", "eu-west", "fra", "eu-west: agency archive"),
    ("hau-radio", "ng-north", "hau", "ng-north: broadcaster archive"),
    ("swa-gazeti", "ke", "swa", "ke: newspaper archive"),
    ("yor-iroyin", "ng-south", "yor", "ng-south: newspaper archive"),
]


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


def make_federation(clients_dir: Path, keys_dir: Path, members=DEMO_FEDERATION,
                    expires: datetime = datetime(2031, 1, 1, tzinfo=timezone.utc)) -> list[Path]:
    """Create authority, client and SuperNode key pairs, sign each client's region
    attestation and write its manifest (which names its private key, relative to the
    manifest). Private keys go to `keys_dir` (keep them out of version control)."""
    clients_dir, keys_dir = Path(clients_dir), Path(keys_dir)
    authorities = {}
    for region in sorted({region for _, region, _, _ in members}):
        authorities[region] = new_key()
        save_private(authorities[region], keys_dir / f"{region}-authority.key")
        save_public(authorities[region], keys_dir / f"{region}-authority.pub")
    server = new_key()
    save_private(server, keys_dir / "server.key")
    save_public(server, keys_dir / "server.pub")
    written = []
    for client_id, region, language, location in members:
        client = new_key()
        save_private(client, keys_dir / f"{client_id}.key")
        save_public(client, keys_dir / f"{client_id}.pub")
        make_node_key(keys_dir / f"{client_id}-node")
        att = issue(authorities[region], client_id, region, public_raw(client), expires)
        path = clients_dir / f"{client_id}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        key_path = Path(os.path.relpath((keys_dir / f"{client_id}.key").resolve(), path.parent.resolve()))
        manifest = {"client_id": client_id, "region": region, "language": language,
                    "data_location": location, "attestation": att.to_dict(), "key": str(key_path)}
        path.write_text(yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True), encoding="utf-8")
        written.append(path)
    return written
