#!/usr/bin/env bash
# Delete the slice (and its queued resource, if it came from one). Checkpoints in a bucket stay.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
usage: tpu_scripts/delete.sh --name NAME --zone ZONE [--direct]
  --direct              the VM was made with create.sh --direct (no queued resource)
USAGE
  usage_common
}

parse_common "$@"
set -- "${EXTRA[@]+"${EXTRA[@]}"}"
DIRECT=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --direct) DIRECT=1; shift ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
mapfile -t FLAGS < <(where)
if [[ "$DIRECT" == 1 ]]; then
  run gcloud compute tpus tpu-vm delete "$NAME" "${FLAGS[@]}" --quiet
else
  # --force deletes the VM the queued resource made, too.
  run gcloud compute tpus queued-resources delete "$NAME" "${FLAGS[@]}" --force --quiet
fi
