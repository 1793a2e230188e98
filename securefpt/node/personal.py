"""What stays on a node: its local head and its personalized model (FedPer, local adaptation).

With `personalization.local_head` the head over the pooled hidden states is the node's
own: it is trained with the shared prompt encoder every round (under the same DP-SGD
when the experiment asks for DP, so the encoder update it shapes stays covered) but is
never sent; only the encoder is aggregated. This also keeps the head's gradient, which
carries sentence embeddings and labels, from leaving the node.

After the last round a node adapts the final global encoder (with its head) on its own
data for `personalization.adapt_epochs` epochs and keeps the result here. Nothing of
it is sent, so the adaptation spends no privacy budget towards the coordinator; the
one number that may leave is its accuracy on the node's evaluation split, and only
where the node's rules release evaluation metrics (node/app.py, `personalize`).
"""

from __future__ import annotations

import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from securefpt.learning.artifacts import load_arrays, save_arrays
from securefpt.protocol.request import REQUEST_FILE, ExperimentRequest

HEAD = "head."
MODEL_FILE = "personalized.safetensors"


class Personal:
    """A node's own parameters for one experiment, in its state folder, beside its own copy of the
    request it trained them under (what `load_personalized` builds the model from)."""

    def __init__(self, state_dir: Path, request: ExperimentRequest, keep: int = 10) -> None:
        self.folder = Path(state_dir) / "personal" / request.sha256()[:16]
        self.request = request
        self.keep = keep

    def head(self, initial: Mapping[str, np.ndarray]) -> "OrderedDict[str, np.ndarray]":
        """The node's head: as last trained here, or the model's initial head before its first round."""
        path = self.folder / "head.safetensors"
        source = load_arrays(path) if path.is_file() else initial
        return OrderedDict((k, source[k]) for k in initial if k.startswith(HEAD))

    def keep_head(self, arrays: Mapping[str, np.ndarray]) -> None:
        self._save("head.safetensors", {k: v for k, v in arrays.items() if k.startswith(HEAD)})

    def keep_model(self, arrays: Mapping[str, np.ndarray]) -> Path:
        return self._save(MODEL_FILE, arrays)

    def _prune(self) -> None:
        """Keep the newest `keep` experiments' folders (by their last write), this one always. A running
        experiment's head is written every round, so only an experiment idle while `keep` others wrote
        since can lose its folder."""
        def written(folder: Path) -> float:
            return max((p.stat().st_mtime for p in folder.iterdir()), default=folder.stat().st_mtime)

        others = sorted((f for f in self.folder.parent.iterdir() if f.is_dir() and f != self.folder),
                        key=written, reverse=True)
        for old in others[self.keep - 1:]:
            shutil.rmtree(old, ignore_errors=True)

    def model(self) -> Optional[dict]:
        path = self.folder / MODEL_FILE
        return load_arrays(path) if path.is_file() else None

    def _save(self, name: str, arrays: Mapping[str, np.ndarray]) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / REQUEST_FILE).is_file():  # written whole or not at all, like the arrays
            partial = self.folder / f"{REQUEST_FILE}.tmp"
            partial.write_text(self.request.to_json(), encoding="utf-8")
            partial.replace(self.folder / REQUEST_FILE)
        tmp = self.folder / f"{name}.tmp"
        save_arrays(tmp, arrays)
        tmp.replace(self.folder / name)  # a crash leaves the previous version
        self._prune()
        return self.folder / name


def load_personalized(run_dir: Path, node: str):
    """A node's personalized model of a run's experiment as the run's own classifier type
    (learning/classifier.py). NODE is the node's state folder, or a client id under the run's
    `nodes/` (the simulation engine keeps its nodes' state there). The run directory only says
    which experiment; the model is built from the node's own copy of the request it trained under."""
    import tempfile

    from securefpt.errors import ConfigError
    from securefpt.learning.adapter import save_classifier
    from securefpt.learning.classifier import from_folder, read_request

    run_dir = Path(run_dir)
    state_dir = Path(node) if Path(node).is_dir() else run_dir / "nodes" / node
    if not state_dir.is_dir():
        raise ConfigError(f"--node {node}: neither a node's state folder nor a node of {run_dir}")
    if not (run_dir / REQUEST_FILE).is_file():
        raise ConfigError(f"{run_dir}: not a run directory ({REQUEST_FILE} missing)")
    personal = Personal(state_dir, read_request(run_dir / REQUEST_FILE))
    arrays = personal.model()
    if arrays is None or not (personal.folder / REQUEST_FILE).is_file():
        raise ConfigError(f"{state_dir}: no personalized model of this run's experiment "
                          "(personalization.adapt_epochs or local_head was off, or the run did not finish)")
    request = read_request(personal.folder / REQUEST_FILE)  # the node's own record, not the coordinator's
    with tempfile.TemporaryDirectory(prefix="securefpt-personal-") as folder:  # the run's own format, read back
        save_classifier(Path(folder), request.model, request.peft, arrays, request.labels, request.seed)
        if request.peft.method == "full":
            save_arrays(Path(folder) / "prompt_encoder.safetensors", arrays)
        return from_folder(Path(folder), request)
