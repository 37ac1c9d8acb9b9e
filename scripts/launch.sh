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
# Rank 0 speaks for the job: its lines lose the launcher's tag ([1,0]<stdout>: under MPI, [0]<stdout>: under Gloo) and
# read like one process's; other ranks keep theirs (they print only warnings and errors).
untag() { sed -u -E 's/^\[(1,)?0\]<std(out|err)>://'; }
# mpirun's two boxes after a rank failed ("Primary job terminated normally, but ..." and "mpirun detected that ...")
# become one line naming the rank and its exit code, and its box about a rank killed by a signal one line naming the
# rank and the signal (without the "PID 0" Open MPI 4.1 prints there); any other box passes as it is.
condense() {
  awk -v dashes="$(printf -- '-%.0s' {1..74})" '
    $0 != dashes && !inbox { print; fflush(); next }
    $0 == dashes && !inbox { inbox = 1; box = $0; next }
    $0 != dashes { box = box "\n" $0; if ($0 ~ /Process name:/) rank = $NF; if ($0 ~ /Exit code:/) code = $NF; next }
    { inbox = 0
      if (box ~ /Primary job +terminated normally/) next
      if (box ~ /mpirun detected that one or more processes exited/) {
        sub(/.*,/, "", rank); sub(/\]+$/, "", rank)
        print "launch.sh: rank " rank " exited with code " code "; mpirun ended the job"; fflush(); next }
      if (match(box, /mpirun noticed that process rank [0-9]+ with PID [0-9]+ on node [^ ]+ exited on signal [^\n]*/)) {
        split(substr(box, RSTART, RLENGTH), w, " "); signal = substr(box, RSTART, RLENGTH); sub(/.* exited on /, "", signal)
        sub(/\.$/, "", signal)
        print "launch.sh: rank " w[6] " on node " w[12] " ended on " signal "; mpirun ended the job"; fflush(); next }
      print box "\n" $0; fflush() }
    END { if (inbox) print box }'
}
# horovodrun's own process imports TensorFlow, whose C++ start-up banners ignore every log level: drop those two lines.
banners() { grep --line-buffered -v -e "All log messages before absl::InitializeLog" -e "oneDNN custom operations are on"; }
if [ "$controller" = mpi ]; then
  exec horovodrun -np "$np" --mpi "$@" > >(untag) 2> >(banners | untag | condense >&2)
fi
# Gloo: horovodrun ends a failed job with its own Python traceback and exit code 1, and the shells of the ranks it
# stopped say "Terminated". As under mpirun: one line naming the first rank that failed, and its exit code as the
# job's. (horovodrun's traceback is the only untagged one: the ranks' lines still carry their tags here.)
notes() { grep --line-buffered -v -E '^(Process [0-9]+ exit with status code -?[0-9]+|Terminating remaining workers after failure of Process [0-9]+)\.$'; }
condense_gloo() {
  awk -v codefile="$1" '
    /^(\[[0-9]+\]<stderr>:)?(Terminated|Killed)$/ { next }
    done && $0 == "" { done = 0; next }   # the blank line that ends that message
    !held && $0 == "Traceback (most recent call last):" { held = $0; next }
    held == "" { print; fflush(); next }
    { held = held "\n" $0; if ($0 ~ /^Process name: /) rank = $NF }
    /^Exit code: / && held ~ /RuntimeError: Horovod detected that one or more processes exited/ {
      print "launch.sh: rank " rank " exited with code " $NF "; horovodrun ended the job"; fflush()
      print $NF > codefile; close(codefile); held = ""; done = 1 }
    END { if (held != "") print held }'
}
codefile="$(mktemp)"
trap 'rm -f "$codefile"' EXIT
exec 4> >(banners | condense_gloo "$codefile" | untag | condense >&2)   # this shell's child: it can be waited for
errors=$!
set +e
horovodrun -np "$np" --gloo "$@" > >(untag | notes) 2>&4
status=$?
exec 4>&-
wait "$errors"   # it has read horovodrun's last line, the first failed rank's exit code
code="$(cat "$codefile")"
[ "$status" = 0 ] || [ -z "$code" ] || status="$code"
exit "$status"
