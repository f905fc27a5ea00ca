#!/usr/bin/env bash
# Install jaxtune, with jax[tpu], on every worker: this checkout's committed tree is copied to each
# worker (git archive), so every host runs the same code.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
usage: tpu_scripts/setup.sh --name NAME --zone ZONE [--ref REF] [--bucket BUCKET]
  --ref REF             the git commit or branch to install (default: HEAD)
  --bucket BUCKET       also mount gs://BUCKET at /mnt/BUCKET on every worker (gcsfuse): a workdir
                        and data that every worker sees
USAGE
  usage_common
}

parse_common "$@"
set -- "${EXTRA[@]+"${EXTRA[@]}"}"
REF=HEAD
BUCKET=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --ref) REF="${2:?--ref needs a value}"; shift 2 ;;
    --bucket) BUCKET="${2:?--bucket needs a bucket name}"; BUCKET="${BUCKET#gs://}"; shift 2 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
mapfile -t FLAGS < <(where)
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TARBALL="${TMPDIR:-/tmp}/jaxtune-$NAME.tar.gz"

run git -C "$ROOT" archive --format=tar.gz --prefix=jaxtune/ -o "$TARBALL" "$REF"
run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:jaxtune.tar.gz" "${FLAGS[@]}" --worker=all
ssh_all "rm -rf ~/jaxtune && tar -xzf ~/jaxtune.tar.gz -C ~ && python3 -m venv ~/jaxtune-venv \
&& ~/jaxtune-venv/bin/pip install -q --upgrade pip && ~/jaxtune-venv/bin/pip install -q -e \"\$HOME/jaxtune[tpu,gcs]\" \
&& ~/jaxtune-venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
if [[ -n "$BUCKET" ]]; then
  # gcsfuse from Google's apt repository (Cloud Storage FUSE's documented install), then the mount.
  ssh_all "if ! command -v gcsfuse > /dev/null; then \
echo deb https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main | sudo tee /etc/apt/sources.list.d/gcsfuse.list \
&& curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /etc/apt/trusted.gpg.d/gcsfuse.asc > /dev/null \
&& sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi \
&& sudo mkdir -p /mnt/$BUCKET && sudo chown \$(id -u):\$(id -g) /mnt/$BUCKET \
&& (mountpoint -q /mnt/$BUCKET || gcsfuse --implicit-dirs $BUCKET /mnt/$BUCKET)"
fi
