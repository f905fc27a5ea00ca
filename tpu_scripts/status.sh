#!/usr/bin/env bash
# The slice's state, whether the training process runs on each worker and the end of its log; with
# --logs DIR, every worker's whole log copied to DIR/worker-N.log.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
usage: tpu_scripts/status.sh --name NAME --zone ZONE [--logs DIR] [--workers N]
  --logs DIR            copy each worker's ~/jaxtune-train.log to DIR/worker-I.log
  --workers N           how many workers the slice has (for --logs; default: asked from gcloud)
USAGE
  usage_common
}

parse_common "$@"
set -- "${EXTRA[@]+"${EXTRA[@]}"}"
LOGS=""
WORKERS=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --logs) LOGS="${2:?--logs needs a directory}"; shift 2 ;;
    --workers) WORKERS="${2:?--workers needs a number}"; shift 2 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
mapfile -t FLAGS < <(where)

run gcloud compute tpus tpu-vm describe "$NAME" "${FLAGS[@]}" --format="value(state,acceleratorType)"
# [j]axtune: the pattern does not match the remote shell whose command line holds it.
ssh_all "echo \$(hostname): \$(pgrep -fc '[j]axtune.train' || true) training process\(es\); tail -n 3 ~/jaxtune-train.log 2>/dev/null || true"
if [[ -n "$LOGS" ]]; then
  if [[ -z "$WORKERS" ]]; then
    if [[ "$DRY_RUN" == 1 ]]; then
      die "--logs with --dry-run needs --workers N"
    fi
    WORKERS=$(gcloud compute tpus tpu-vm describe "$NAME" "${FLAGS[@]}" --format="value(networkEndpoints.len())")
  fi
  run mkdir -p "$LOGS"
  for ((i = 0; i < WORKERS; i++)); do
    run gcloud compute tpus tpu-vm scp "$NAME:jaxtune-train.log" "$LOGS/worker-$i.log" "${FLAGS[@]}" --worker="$i"
  done
fi
