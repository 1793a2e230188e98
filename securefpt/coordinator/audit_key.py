"""The coordinator's audit key: long-lived, pinned in the policy, never in a run directory.

Whoever can edit a run directory could re-sign a log with a key kept beside it, so the
key lives where the coordinator's configuration says (`server_key`), and a federation's
policy pins its public half (`server.audit_key`): `audit verify` checks against the pin.
Without a policy (local trials) the operator's own key under `$SECUREFPT_HOME` signs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from securefpt.errors import ConfigError
from securefpt.experiment.config import ExperimentConfig
from securefpt.home import securefpt_home
from securefpt.protocol.attestation import load_private, load_public, new_key, public_raw, save_private, save_public
from securefpt.protocol.policy import Policy, load_policy


def _inside(path: Path, folder: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def coordinator_key(cfg: ExperimentConfig, out_dir: Path,
                    policy: Optional[Policy] = None) -> tuple[Ed25519PrivateKey, Path]:
    """(the audit signing key, the public key file to verify with) for a run into `out_dir`, under
    `policy` (or cfg.policy read now)."""
    if cfg.policy is not None and policy is None:
        policy = load_policy(cfg.policy)
    pinned: Optional[Path] = policy.server.audit_key if policy is not None else None
    if cfg.server_key is None:
        if pinned is not None:
            raise ConfigError(f"server_key: the policy {cfg.policy} pins the coordinator's audit key "
                              f"({pinned}); set server_key to its private half")
        path = securefpt_home() / "coordinator" / "audit.key"
        if not path.is_file():
            save_private(new_key(), path)
            save_public(load_private(path), path.with_suffix(".pub"))
        return load_private(path), path.with_suffix(".pub")
    if _inside(cfg.server_key, out_dir):
        raise ConfigError(f"server_key: {cfg.server_key} lies inside the run directory; the audit key must live "
                          "where the coordinator's configuration keeps it")
    key = load_private(cfg.server_key)
    if pinned is not None:
        if public_raw(load_public(pinned)) != public_raw(key):
            raise ConfigError(f"server_key: {cfg.server_key} is not the audit key pinned in {cfg.policy}")
        return key, pinned
    public = cfg.server_key.with_suffix(".pub")
    if not public.is_file():
        save_public(key, public)
    return key, public
