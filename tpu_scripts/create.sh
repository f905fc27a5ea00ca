#!/usr/bin/env bash
# Create a TPU VM or pod slice: through a queued resource (the default; it waits for capacity instead
# of failing) or, with --direct, a plain `tpu-vm create`.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
usage: tpu_scripts/create.sh --name NAME --zone ZONE --accelerator TYPE [options]
  --accelerator TYPE    Cloud TPU accelerator type: v5p-64, v6e-256, v5litepod-16, ...  [env ACCELERATOR]
  --runtime VERSION     software version (default: the one for the accelerator's generation)
  --direct              create the VM at once (tpu-vm create) instead of queueing a request
  --spot                spot capacity (cheaper; can be preempted: jaxtune saves on SIGTERM and resumes)
  --reserved            use the project's reservation
  --num-slices N        multi-slice: N slices of TYPE over the data-center network (queued only)
USAGE
  usage_common
}

parse_common "$@"
set -- "${EXTRA[@]+"${EXTRA[@]}"}"
DIRECT=0
CAPACITY=()
SLICES=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --direct) DIRECT=1; shift ;;
    --spot) CAPACITY+=(--spot); shift ;;
    --reserved) CAPACITY+=(--reserved); shift ;;
    --num-slices) SLICES="${2:?--num-slices needs a value}"; shift 2 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ -n "$ACCELERATOR" ]] || die "no accelerator type: pass --accelerator (v5p-64, v6e-256, ...)"
RUNTIME="${RUNTIME:-$(runtime_for "$ACCELERATOR")}"
mapfile -t FLAGS < <(where)

if [[ "$DIRECT" == 1 ]]; then
  [[ "$SLICES" == 1 ]] || die "--num-slices needs a queued resource; drop --direct"
  spot=()
  [[ " ${CAPACITY[*]-} " == *" --spot "* ]] && spot=(--spot)
  run gcloud compute tpus tpu-vm create "$NAME" "${FLAGS[@]}" \
    --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${spot[@]+"${spot[@]}"}"
elif [[ "$SLICES" == 1 ]]; then
  run gcloud compute tpus queued-resources create "$NAME" "${FLAGS[@]}" --node-id="$NAME" \
    --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" "${CAPACITY[@]+"${CAPACITY[@]}"}"
else
  run gcloud compute tpus queued-resources create "$NAME" "${FLAGS[@]}" --node-count="$SLICES" \
    --node-prefix="$NAME" --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" \
    "${CAPACITY[@]+"${CAPACITY[@]}"}"
fi
[[ "$DRY_RUN" == 1 ]] || echo "requested $ACCELERATOR as $NAME; tpu_scripts/status.sh --name $NAME --zone $ZONE shows its state"
