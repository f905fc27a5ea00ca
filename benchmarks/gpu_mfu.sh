#!/usr/bin/env bash
# MFU of a ~1B Llama's train step in bfloat16 on one GPU (see benchmarks/gpu_mfu.py): under 10 minutes.
#
#   bash benchmarks/gpu_mfu.sh [--batch 8] [--seq-len 2048] [--steps 10] [--json FILE] [--variants ...]
#       [--budget SECONDS] [--profile FOLDER]
#
# Needs a Python with jax[cuda], flax, optax, orbax-checkpoint, transformers, pyyaml, etils and
# ml_collections (PYTHON=... picks it; default python3). jaxtune itself is read from this checkout. A
# machine that cannot reach PyPI can be handed the missing pure-Python wheels in .whl/ (pip download
# --no-deps ml_collections), which this script installs into a temporary folder first.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if ! "$python" -c "import ml_collections" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --target /tmp/jaxtune-site .whl/*.whl
    export PYTHONPATH=/tmp/jaxtune-site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "gpu_mfu: $python has no ml_collections; pip install ml_collections, or put its wheel in .whl/" >&2
    exit 2
  fi
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec timeout 570 "$python" benchmarks/gpu_mfu.py "$@"
