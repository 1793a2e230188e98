"""One switch for hub access: offline unless SECUREFPT_ALLOW_DOWNLOAD=1.

These machines have no route to a model or dataset hub; without the switch a hub id
that is not cached would wait on network retries instead of failing at once.
"""

from __future__ import annotations

import os


def downloads_allowed() -> bool:
    return os.environ.get("SECUREFPT_ALLOW_DOWNLOAD", "") == "1"


def hf_offline_kwargs() -> dict:
    """Keyword arguments for `from_pretrained`: local files only unless downloads are allowed."""
    return {} if downloads_allowed() else {"local_files_only": True}


def datasets_offline() -> None:
    """Put `datasets` in offline mode (it reads its env switches once, at import)."""
    if downloads_allowed():
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets.config

    datasets.config.HF_HUB_OFFLINE = True
    if hasattr(datasets.config, "HF_DATASETS_OFFLINE"):
        datasets.config.HF_DATASETS_OFFLINE = True
