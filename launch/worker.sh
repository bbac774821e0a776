#!/usr/bin/env bash
# Runs on each TPU VM worker; launch/tpu.py calls it over `gcloud compute tpus tpu-vm ssh`.
#   launch/worker.sh setup JAX_VERSION        virtual environment, ./setup.sh, jax[tpu]
#   launch/worker.sh fetch gs://SOURCE DEST   copy a gs:// folder to this worker's disk
#   launch/worker.sh mount BUCKET             mount BUCKET at /mnt/gcs/BUCKET with gcsfuse
#   launch/worker.sh start JOB -- COMMAND...  run COMMAND detached; log in ~/clasp-logs/JOB.log
#   launch/worker.sh follow JOB               print JOB's log as it grows until JOB ends,
#                                             then exit with JOB's exit status
# CLASP_VENV (default ~/clasp-venv) and CLASP_LOGS (default ~/clasp-logs) move those folders.
set -euo pipefail

REPOSITORY=$(cd "$(dirname "$0")/.." && pwd)
VENV=${CLASP_VENV:-$HOME/clasp-venv}
LOGS=${CLASP_LOGS:-$HOME/clasp-logs}
MOUNTS=/mnt/gcs

die() {
  echo "worker.sh: $*" >&2
  exit 2
}

activate() {
  [[ -f "$VENV/bin/activate" ]] || die "no virtual environment at $VENV (run setup first)"
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
}

setup() {
  local jax_version=$1
  if [[ ! -x "$VENV/bin/pip" ]]; then
    # Some TPU runtime images ship Python without ensurepip, which venv needs.
    if ! python3 -m venv "$VENV"; then
      sudo apt-get update
      sudo DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv
      rm -rf "$VENV"
      python3 -m venv "$VENV"
    fi
  fi
  activate
  (cd "$REPOSITORY" && ./setup.sh)
  # After setup.sh: its `pip install -e .` may bring a CPU-only jax; this replaces it with the
  # TPU build (jax plus the matching libtpu).
  python -m pip install "jax[tpu]==${jax_version}"
  python -c 'import jax; print(jax.process_index(), jax.local_device_count(), "TPU devices")'
}

own_folder() {
  sudo mkdir -p "$1"
  sudo chown "$(id -u):$(id -g)" "$1"
}

fetch() {
  local source=$1 destination=$2
  own_folder "$destination"
  gcloud storage rsync --recursive "$source" "$destination"
}

install_gcsfuse() {
  local codename keyring=/usr/share/keyrings/cloud.google.asc
  codename=$(lsb_release -c -s)
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee "$keyring" >/dev/null
  echo "deb [signed-by=$keyring] https://packages.cloud.google.com/apt gcsfuse-$codename main" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  sudo apt-get update
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y gcsfuse
}

mount_bucket() {
  local bucket=$1 point="$MOUNTS/$1"
  if mountpoint -q "$point"; then
    return 0
  fi
  command -v gcsfuse >/dev/null || install_gcsfuse
  own_folder "$point"
  # Orbax writes each checkpoint into a temporary folder and renames it when complete;
  # gcsfuse refuses folder renames unless --rename-dir-limit allows them.
  gcsfuse --implicit-dirs --rename-dir-limit=200000 "$bucket" "$point"
}

start() {
  local job=$1
  shift
  [[ ${1:-} == "--" ]] && shift
  [[ $# -gt 0 ]] || die "start $job: no command after --"
  mkdir -p "$LOGS"
  if [[ -f "$LOGS/$job.pid" ]] && kill -0 "$(cat "$LOGS/$job.pid")" 2>/dev/null; then
    die "job $job is still running (pid $(cat "$LOGS/$job.pid"))"
  fi
  rm -f "$LOGS/$job.rc"
  activate
  cd "$REPOSITORY"
  # setsid and nohup: the job has to outlive the ssh session that starts it. The inner shell
  # records the job's exit status for `follow`.
  # shellcheck disable=SC2016
  STATUS_FILE="$LOGS/$job.rc" setsid nohup bash -c '"$@"; echo "$?" > "$STATUS_FILE"' "$job" "$@" \
    >"$LOGS/$job.log" 2>&1 </dev/null &
  echo "$!" >"$LOGS/$job.pid"
  echo "started $job (pid $!) on $(hostname); log: $LOGS/$job.log"
}

follow() {
  local job=$1
  [[ -f "$LOGS/$job.pid" ]] || die "no job $job was started on $(hostname)"
  # tail stops by itself once the job's process has exited.
  tail -n +1 -F --pid="$(cat "$LOGS/$job.pid")" "$LOGS/$job.log" 2>/dev/null
  [[ -f "$LOGS/$job.rc" ]] || die "job $job ended without an exit status (killed?)"
  exit "$(cat "$LOGS/$job.rc")"
}

[[ $# -gt 0 ]] || die "usage: see the comment at the top of $0"
command=$1
shift
case "$command" in
  setup) [[ $# -eq 1 ]] || die "usage: setup JAX_VERSION"; setup "$1" ;;
  fetch) [[ $# -eq 2 ]] || die "usage: fetch gs://SOURCE DEST"; fetch "$1" "$2" ;;
  mount) [[ $# -eq 1 ]] || die "usage: mount BUCKET"; mount_bucket "$1" ;;
  start) [[ $# -ge 1 ]] || die "usage: start JOB -- COMMAND..."; start "$@" ;;
  follow) [[ $# -eq 1 ]] || die "usage: follow JOB"; follow "$1" ;;
  -h | --help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) die "unknown command $command (see --help)" ;;
esac
