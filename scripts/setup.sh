#!/usr/bin/env bash
# Create .venv and install securefpt with its test extras, offline-safe: only PyPI is used.
# torch: the CPU build from this machine's wheel folder when present (a plain `torch`
# requirement would pull a multi-GB CUDA build).
# It also prepares Flower's own CLI for this checkout (`flwr run .`): a Flower home in .flwr/
# whose local connection starts one virtual node per institution of the default experiment,
# and, in .venv/bin/activate, FLWR_HOME and no runtime dependency installation (Flower would
# otherwise `uv sync` the dependencies into a fresh environment: a CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if [ -d /opt/wheels ] && ls /opt/wheels/torch-2.13.0* >/dev/null 2>&1; then
    python -m pip install -q "torch==2.13.0" --find-links /opt/wheels
  else
    python -m pip install -q "torch>=2.4,<2.15"
  fi
fi
python -m pip install -q -e ".[test]"
python -m securefpt.engines.flower_home "$PWD/.flwr" securefpt/configs/demo.yaml
sed -i "/^# securefpt: Flower's CLI for this checkout/,\$d" .venv/bin/activate  # the block below, last in the file
cat >> .venv/bin/activate <<ACTIVATE
# securefpt: Flower's CLI for this checkout (flwr run .)
export FLWR_HOME="$PWD/.flwr"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export SECUREFPT_FLWR_SIMULATION=1   # this machine's virtual nodes read their files by partition id
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0   # no GPUs here: silences Ray's notice about them
ACTIVATE
echo "securefpt installed in .venv ($(python -c 'import securefpt; print(securefpt.__version__)'))"
