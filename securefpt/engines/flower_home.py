"""A Flower home for `flwr run .` in this checkout (scripts/setup.sh writes it to .flwr/).

Flower's local simulation starts two virtual nodes unless told otherwise, and the app's
pyproject.toml cannot tell it (Flower 1.41). This writes `config.toml` whose local
connection starts one virtual node per institution (or trial node) of an experiment,
each on one CPU, with the nodes' own output kept off the driver's stream (as `securefpt
run` keeps it; Flower ignores these options when `--federation-config` is given):

    python -m securefpt.engines.flower_home DIR EXPERIMENT.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

from securefpt.experiment.loading import load_config


def write_flower_home(folder: Path, experiment: Path) -> Path:
    nodes = len(load_config(experiment).data.languages)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    path.write_text(f"""# Written by scripts/setup.sh: Flower's CLI for this checkout (securefpt/engines/flower_home.py)
[superlink]
default = "local"

[superlink.local]
address = ":local:"

[superlink.local.options]
num-supernodes = {nodes}  # one virtual node per institution of {experiment}

[superlink.local.options.backend.client-resources]
num-cpus = 1

[superlink.local.options.backend.init-args]
log-to-driver = false  # quiet as `securefpt run`: a node's errors stay in its own state folder's log
logging-level = "error"
""", encoding="utf-8")
    return path


if __name__ == "__main__":
    print(f"Flower home: {write_flower_home(Path(sys.argv[1]), Path(sys.argv[2]))}")
