#!/usr/bin/env bash
# Set up hvdtrain on Debian 12 / Python 3.11: system packages, .venv, TensorFlow 2.15, Horovod built from source.
# Idempotent: each step checks first and does nothing when it is already done.
#
#   scripts/install.sh                    # CPU stack (what `make train` and `make test` need)
#   scripts/install.sh --rebuild-horovod  # force a Horovod rebuild (after changing TensorFlow)
#   scripts/install.sh --with-slurm       # also Slurm + munge, for the slurm/ tests and a local cluster
#   GPU nodes: HVDTRAIN_GPU=1 scripts/install.sh  -> tensorflow[and-cuda]==2.15.1 and HOROVOD_GPU_OPERATIONS=NCCL
set -euo pipefail
cd "$(dirname "$0")/.."

TF_VERSION=2.15.1
HOROVOD_VERSION=0.28.1
PYTHON="${PYTHON:-python3}"
APT_CORE=(libopenmpi-dev openmpi-bin g++ make cmake git)
APT_SLURM=(slurmctld slurmd slurm-client munge iproute2)
rebuild=0; with_slurm=0
for arg in "$@"; do
  case "$arg" in
    --rebuild-horovod) rebuild=1 ;;
    --with-slurm) with_slurm=1 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

say()  { printf '\033[1m[install]\033[0m %s\n' "$*"; }
fail() { printf '[install] FAILED: %s\n' "$*" >&2; exit 1; }

# 1. System packages (only the missing ones; apt-get update once, only if something is missing).
packages=("${APT_CORE[@]}")
[ "$with_slurm" = 1 ] && packages+=("${APT_SLURM[@]}")
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
  [ "$(id -u)" = 0 ] || fail "missing Debian packages: ${missing[*]}; run: sudo apt-get install -y ${missing[*]}"
  say "installing Debian packages: ${missing[*]}"
  apt-get update -qq || fail "apt-get update failed; check the package mirror"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
    || fail "apt-get install ${missing[*]} failed"
fi
command -v mpirun >/dev/null || fail "mpirun not found after installing openmpi-bin"

# 2. Python and the virtualenv.
"$PYTHON" -c 'import sys; assert (3, 10) <= sys.version_info[:2] <= (3, 11)' 2>/dev/null \
  || fail "$("$PYTHON" --version 2>&1) found; TensorFlow $TF_VERSION needs Python 3.10 or 3.11 (set PYTHON=/path/to/python3.11)"
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv || fail "python -m venv failed; install the venv module (apt-get install python3-venv)"
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip setuptools wheel

# 3. The Python stack: TensorFlow first, because Horovod compiles against it.
if [ "${HVDTRAIN_GPU:-0}" = 1 ]; then tf_req="tensorflow[and-cuda]==$TF_VERSION"; else tf_req="tensorflow-cpu==$TF_VERSION"; fi
if ! .venv/bin/python -c "import tensorflow as tf; assert tf.__version__ == '$TF_VERSION'" 2>/dev/null; then
  say "installing $tf_req"
  "${pip[@]}" install "$tf_req" || fail "pip install $tf_req failed"
  rebuild=1  # Horovod must be rebuilt whenever TensorFlow changes
fi
say "installing hvdtrain (editable) and its test tools"
"${pip[@]}" install --no-build-isolation -e ".[test]" || fail "pip install -e .[test] failed"

# 4. Horovod from source, against this TensorFlow, with MPI and Gloo (and NCCL on GPU nodes).
horovod_ok() {
  .venv/bin/python - <<PY 2>/dev/null
import horovod, horovod.tensorflow as h
assert horovod.__version__ == "$HOROVOD_VERSION"
assert h.mpi_built() and h.gloo_built()
PY
}
if [ "$rebuild" = 1 ] || ! horovod_ok; then
  say "building horovod==$HOROVOD_VERSION from source (about 3 minutes on 2 cores)"
  gpu_ops=(); [ "${HVDTRAIN_GPU:-0}" = 1 ] && gpu_ops=(HOROVOD_GPU_OPERATIONS=NCCL)
  env HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
      HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS="-j$(nproc)" "${gpu_ops[@]}" \
      "${pip[@]}" install --no-cache-dir --no-build-isolation --force-reinstall --no-deps "horovod==$HOROVOD_VERSION" \
    || fail "building Horovod failed; scroll up for the compiler error (needs g++, cmake, libopenmpi-dev)"
  "${pip[@]}" install "horovod==$HOROVOD_VERSION" >/dev/null  # its pure-Python dependencies
fi

# 5. Verify the build the way users will see it.
check="$(.venv/bin/horovodrun --check-build 2>&1)" || fail "horovodrun --check-build failed: $check"
for want in TensorFlow MPI Gloo; do
  grep -Eq "\[X\] $want" <<<"$check" || fail "Horovod was built without $want:
$check
fix: scripts/install.sh --rebuild-horovod (needs libopenmpi-dev for MPI)"
done
.venv/bin/hvdtrain doctor >/dev/null || fail "hvdtrain doctor reports a problem; run .venv/bin/hvdtrain doctor"
touch .venv/.hvdtrain-installed  # the Makefile's stamp: `make train`/`make test` skip the install from now on
say "ready: TensorFlow $TF_VERSION, Horovod $HOROVOD_VERSION (TensorFlow, MPI, Gloo)"
