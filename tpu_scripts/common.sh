# shellcheck shell=bash
# Shared by the tpu_scripts: flags (each also an environment variable), and `run`, which prints a
# gcloud command under --dry-run instead of running it. Sourced, never run.

# shellcheck disable=SC2034  # the scripts that source this file read them
NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
ACCELERATOR="${ACCELERATOR:-}"
RUNTIME="${RUNTIME_VERSION:-}"
DRY_RUN=0
EXTRA=()

usage_common() {
  cat <<'USAGE'
  --name NAME           TPU VM (or pod slice) name            [env TPU_NAME]
  --zone ZONE           e.g. us-east5-a                       [env ZONE]
  --project PROJECT     Google Cloud project (default: gcloud's) [env PROJECT]
  --dry-run             print the gcloud commands instead of running them
USAGE
}

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# parse_common "$@": takes the common flags and leaves the rest in EXTRA.
parse_common() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --name) NAME="${2:?--name needs a value}"; shift 2 ;;
      --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
      --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
      --accelerator) ACCELERATOR="${2:?--accelerator needs a value}"; shift 2 ;;
      --runtime) RUNTIME="${2:?--runtime needs a value}"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h | --help) usage; exit 0 ;;
      *) EXTRA+=("$1"); shift ;;
    esac
  done
  [[ -n "$NAME" ]] || die "no TPU name: pass --name NAME or set TPU_NAME"
  [[ -n "$ZONE" ]] || die "no zone: pass --zone ZONE or set ZONE"
}

# The gcloud flags every command takes.
where() {
  local flags=(--zone="$ZONE")
  [[ -n "$PROJECT" ]] && flags+=(--project="$PROJECT")
  printf '%s\n' "${flags[@]}"
}

# The software image a TPU generation boots (Cloud TPU's runtime versions).
runtime_for() {
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v4-*) echo tpu-ubuntu2204-base ;;
    *) die "no runtime version known for accelerator $1; pass --runtime" ;;
  esac
}

# quote ARG: ARG as a shell word, in single quotes when it needs any.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# run CMD...: the command, printed as one shell line under --dry-run, else run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    local out="" arg
    for arg in "$@"; do
      out+="$(quote "$arg") "
    done
    echo "${out% }"
  else
    "$@"
  fi
}

# ssh_all COMMAND: one shell command on every worker of the slice.
ssh_all() {
  local flags
  mapfile -t flags < <(where)
  run gcloud compute tpus tpu-vm ssh "$NAME" "${flags[@]}" --worker=all --command="$1"
}
