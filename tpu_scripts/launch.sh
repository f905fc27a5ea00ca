#!/usr/bin/env bash
# Start the same training command on every worker, detached from the ssh session (a dropped
# connection does not stop it); each worker logs to ~/jaxtune-train.log. On Cloud TPU, JAX finds the
# other workers itself: no coordinator flag is needed.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
usage: tpu_scripts/launch.sh --name NAME --zone ZONE --config CONFIG --workdir /mnt/BUCKET/RUN [-- ARGS...]
  --config CONFIG       a config file of this repository, e.g. configs/llama3_8b.py
  --workdir DIR         where checkpoints and metrics go; on a pod, a directory every worker sees
                        (the bucket setup.sh --bucket mounted)
  --env KEY=VALUE       an environment variable for the run on every worker (repeatable)
  ARGS                  more arguments for jaxtune.train (--config.KEY=VALUE overrides)
USAGE
  usage_common
}

parse_common "$@"
set -- "${EXTRA[@]+"${EXTRA[@]}"}"
CONFIG=""
WORKDIR=""
ENVS=()
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) CONFIG="${2:?--config needs a value}"; shift 2 ;;
    --workdir) WORKDIR="${2:?--workdir needs a value}"; shift 2 ;;
    --env) ENVS+=("${2:?--env needs KEY=VALUE}"); shift 2 ;;
    --) shift; ARGS+=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ -n "$CONFIG" ]] || die "no config: pass --config configs/NAME.py"
[[ -n "$WORKDIR" ]] || die "no workdir: pass --workdir /mnt/BUCKET/RUN"
[[ "$WORKDIR" != gs://* ]] || die "--workdir $WORKDIR: mount the bucket (setup.sh --bucket) and pass /mnt/BUCKET/..."

train=""
for kv in "${ENVS[@]+"${ENVS[@]}"}"; do
  train+="$(quote "$kv") "
done
workdir="$(quote "$WORKDIR")"
if [[ "$WORKDIR" == \~/* ]]; then  # the worker's home, not this machine's: expanded there
  workdir="\$HOME/$(quote "${WORKDIR#\~/}")"
fi
train+="\$HOME/jaxtune-venv/bin/python -m jaxtune.train --config $(quote "$CONFIG") --workdir $workdir"
for a in "${ARGS[@]+"${ARGS[@]}"}"; do
  train+=" $(quote "$a")"
done
# setsid + nohup: the run belongs to no terminal, so closing ssh sends it no SIGHUP.
ssh_all "cd ~/jaxtune && (setsid nohup env $train > ~/jaxtune-train.log 2>&1 < /dev/null &) && echo started on \$(hostname)"
[[ "$DRY_RUN" == 1 ]] || echo "tpu_scripts/status.sh --name $NAME --zone $ZONE --logs shows its progress"
