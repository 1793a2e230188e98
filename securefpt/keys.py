"""Keys for a federation: region authorities, clients, attestations (`securefpt keys`).

Real deployments bring their own authorities; this creates a complete demo federation
so that policies, attestations and the audit log can be exercised end to end.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import yaml

from securefpt.attestation import issue, new_key, public_raw, save_private, save_public

# (client id, region, language, where its data lives) of the MasakhaNEWS demo federation
DEMO_FEDERATION = [
    ("eng-newsroom", "uk", "eng", "uk: newsroom archive"),
    ("fra-agence", "eu-west", "fra", "eu-west: agency archive"),
    ("hau-radio", "ng-north", "hau", "ng-north: broadcaster archive"),
    ("swa-gazeti", "ke", "swa", "ke: newspaper archive"),
    ("yor-iroyin", "ng-south", "yor", "ng-south: newspaper archive"),
]


def make_federation(clients_dir: Path, keys_dir: Path, members=DEMO_FEDERATION,
                    expires: datetime = datetime(2031, 1, 1, tzinfo=timezone.utc)) -> list[Path]:
    """Create authority and client key pairs, sign each client's region attestation and
    write its manifest. Private keys go to `keys_dir` (keep them out of version control)."""
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
        att = issue(authorities[region], client_id, region, public_raw(client), expires)
        manifest = {"client_id": client_id, "region": region, "language": language,
                    "data_location": location, "attestation": att.to_dict()}
        path = clients_dir / f"{client_id}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True), encoding="utf-8")
        written.append(path)
    return written
