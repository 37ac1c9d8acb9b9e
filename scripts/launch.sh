#!/usr/bin/env bash
# Run a command on N local ranks with horovodrun, from the project's virtualenv.
#   scripts/launch.sh 2 hvdtrain train --config configs/digits.yaml
# Controller: HVDTRAIN_CONTROLLER=mpi (default; OpenMPI shared memory is the fastest path on one host) or gloo.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
np="${1:?usage: scripts/launch.sh NUM_RANKS COMMAND...}"; shift
[[ "$np" =~ ^[1-9][0-9]*$ ]] || { echo "launch.sh: NUM_RANKS must be a positive integer, got '$np'" >&2; exit 2; }
[ -x "$here/.venv/bin/horovodrun" ] || { echo "launch.sh: $here/.venv has no Horovod; run scripts/install.sh first" >&2; exit 2; }
export PATH="$here/.venv/bin:$PATH" TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
if [ "$(id -u)" = 0 ]; then  # OpenMPI refuses root unless told; containers and CI often run as root
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
controller="${HVDTRAIN_CONTROLLER:-mpi}"
case "$controller" in mpi|gloo) ;; *) echo "launch.sh: HVDTRAIN_CONTROLLER must be mpi or gloo" >&2; exit 2;; esac
# horovodrun's own process imports TensorFlow, whose C++ start-up banners ignore every log level: drop those two lines.
exec horovodrun -np "$np" "--$controller" "$@" \
  2> >(grep --line-buffered -v -e "All log messages before absl::InitializeLog" -e "oneDNN custom operations are on" >&2)
