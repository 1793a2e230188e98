"""Ed25519 keys and region attestations: "client K, serving language L, is in region R until T",
signed by R's authority.

An attestation binds a client id, the language it serves and its public key to a
region. Whoever checks it (the coordinator for eligibility, every node for its peers
and for itself) uses the authority key its own trust store holds *for the claimed
region*, so a client cannot claim a region whose authority did not sign for it, nor
another language, whatever keys it holds.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from securefpt.errors import ConfigError


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def canonical(obj: dict) -> bytes:
    """The bytes that are hashed and signed: sorted keys, no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def new_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_raw(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def save_private(key: Ed25519PrivateKey, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def save_public(key: Ed25519PrivateKey | Ed25519PublicKey, path: Path) -> None:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def load_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable Ed25519 private key ({type(exc).__name__})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 private key")
    return key


def load_public(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable Ed25519 public key ({type(exc).__name__})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path}: not an Ed25519 public key")
    return key


def verify(public: Ed25519PublicKey, signature: bytes, payload: bytes) -> bool:
    try:
        public.verify(signature, payload)
        return True
    except InvalidSignature:
        return False


@dataclass(frozen=True)
class Attestation:
    client_id: str
    region: str
    language: str
    client_public_key: str  # base64 of the raw 32-byte Ed25519 key
    expires: str  # ISO 8601, UTC
    signature: str = ""  # base64, by the region's authority

    def payload(self) -> bytes:
        fields = asdict(self)
        fields.pop("signature")
        return canonical(fields)

    def to_dict(self) -> dict:
        return asdict(self)


def issue(authority: Ed25519PrivateKey, client_id: str, region: str, language: str, client_public: bytes,
          expires: datetime) -> Attestation:
    expiry = expires.astimezone(timezone.utc).isoformat()
    unsigned = Attestation(client_id, region, language, b64(client_public), expiry)
    return Attestation(**{**unsigned.to_dict(), "signature": b64(authority.sign(unsigned.payload()))})


def check_attestation(att: Optional[Attestation], client_id: str, region: str,
                      authority: Optional[Ed25519PublicKey], now: datetime,
                      language: Optional[str] = None) -> Optional[str]:
    """Why this client's claim (id, region, and language where given) must be rejected, or None if it holds."""
    if att is None or not att.signature:
        return "unattested: no signed region attestation"
    if authority is None:
        return f"region '{region}' has no trusted authority key"
    if att.client_id != client_id:
        return f"attestation is for client '{att.client_id}', not '{client_id}'"
    if att.region != region:
        return f"attestation is for region '{att.region}', not the claimed '{region}'"
    if language is not None and att.language != language:
        return f"attestation is for language '{att.language}', not the claimed '{language}'"
    try:
        signature = unb64(att.signature)
    except ValueError:
        return "forged attestation: signature is not base64"
    if not verify(authority, signature, att.payload()):
        return f"forged attestation: not signed by the authority of region '{region}'"
    try:
        expires = datetime.fromisoformat(att.expires)
    except ValueError:
        return f"attestation has a malformed expiry '{att.expires}'"
    if expires.tzinfo is None:
        expires = expires.replace(tzinfo=timezone.utc)
    if expires <= now:
        return f"attestation expired on {att.expires}"
    return None


def attested_key(att: Attestation) -> Ed25519PublicKey:
    """The client's public key that an (already checked) attestation names."""
    try:
        return Ed25519PublicKey.from_public_bytes(unb64(att.client_public_key))
    except ValueError:
        raise ConfigError(f"attestation of '{att.client_id}' holds a malformed public key") from None
