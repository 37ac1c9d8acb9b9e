#!/usr/bin/env bash
# Set up hvdtrain on Debian 12 / Python 3.11: system packages, a virtualenv, TensorFlow, Horovod built from source.
# Idempotent: every step checks first and does nothing when it is already done; `make train` and `make test` call it.
#
#   scripts/install.sh                         # current stack: TensorFlow 2.21 + Keras 3 (hvdtrain's own Keras layer)
#   scripts/install.sh --stack tf2.15          # the 2023 stack: TensorFlow 2.15 + Keras 2 (Horovod's Keras layer)
#   scripts/install.sh --venv DIR              # another virtualenv (default .venv); `make test` puts tf2.15 in .venv-tf2.15
#   scripts/install.sh --with-slurm            # also munge + Slurm (tests/slurm/ and scripts/slurm-local.sh need them)
#   scripts/install.sh --rebuild-horovod       # force a Horovod rebuild
#   scripts/install.sh --venv DIR --extra-patch FILE   # one more Horovod patch (e.g. scripts/breakdown's probe)
#   HVDTRAIN_GPU=1 scripts/install.sh          # GPU nodes: tensorflow[and-cuda] and HOROVOD_GPU_OPERATIONS=NCCL
# A virtualenv that holds the other stack is converted in place (TensorFlow, Keras and NumPy replaced, leftovers of
# the old stack removed, Horovod rebuilt); `pip check` must pass afterwards. Logs of the Horovod build: VENV/horovod-build.log.
set -euo pipefail
cd "$(dirname "$0")/.."

HOROVOD_VERSION=0.28.1
HOROVOD_SDIST_SHA256=92a43f5a94c43907a56805bad15f19700c62ffc83b7ca483f9e104e229f67ef0
PYTHON="${PYTHON:-python3}"
APT_CORE=(libopenmpi-dev openmpi-bin g++ make cmake git patch)
APT_SLURM=(slurmctld slurmd slurm-client munge iproute2)
stack=tf2.21; venv=.venv; rebuild=0; with_slurm=0; gpu="${HVDTRAIN_GPU:-0}"; extra_patches=()
while [ $# -gt 0 ]; do
  case "$1" in
    --stack) stack="${2:?--stack needs tf2.21 or tf2.15}"; shift ;;
    --venv) venv="${2:?--venv needs a directory}"; shift ;;
    --rebuild-horovod) rebuild=1 ;;
    --extra-patch) extra_patches+=("${2:?--extra-patch needs a patch file}"); shift ;;
    --with-slurm) with_slurm=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
# Patches both stacks get (each patch's header says why); the stack's own come after them.
COMMON_PATCHES=(scripts/patches/horovod-0.28.1-build.patch scripts/patches/horovod-0.28.1-runner.patch
                scripts/patches/horovod-0.28.1-wake-on-enqueue.patch scripts/patches/horovod-0.28.1-scale-on-copy-out.patch)
case "$stack" in
  tf2.21|current) stack=tf2.21; TF_VERSION=2.21.0; KERAS_MAJOR=3
                  PATCHES=("${COMMON_PATCHES[@]}" scripts/patches/horovod-0.28.1-tf2.21.patch)
                  [ "$gpu" = 1 ] && PATCHES+=(scripts/patches/horovod-0.28.1-tf2.21-gpu.patch) ;;
  tf2.15) TF_VERSION=2.15.1; KERAS_MAJOR=2
          PATCHES=("${COMMON_PATCHES[@]}") ;;
  *) echo "install.sh: --stack must be tf2.21 or tf2.15, got '$stack'" >&2; exit 2 ;;
esac
PATCHES+=("${extra_patches[@]}")   # in the build record too: an install without them rebuilds

say()  { printf '\033[1m[install]\033[0m %s\n' "$*"; }
fail() { printf '[install] FAILED: %s\n' "$*" >&2; exit 1; }
py()   { TF_CPP_MIN_LOG_LEVEL=3 "$venv/bin/python" "$@"; }
# pip, quiet: its output goes to a log that is printed in full only when pip fails (every error shown, no noise).
pip_q() {
  local log; log="$(mktemp)"
  if "$venv/bin/python" -m pip --disable-pip-version-check -q "$@" >"$log" 2>&1; then rm -f "$log"; return 0; fi
  grep -v "^WARNING: Location '.*' is ignored" "$log" >&2; rm -f "$log"; return 1
}
pip=(pip_q)

# 1. System packages (only the missing ones; apt-get update once, only if something is missing).
packages=("${APT_CORE[@]}")
[ "$with_slurm" = 1 ] && packages+=("${APT_SLURM[@]}")
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then sudo=(); elif sudo -n true 2>/dev/null; then sudo=(sudo -n); else
    fail "missing Debian packages: ${missing[*]}; install them with: sudo apt-get install -y ${missing[*]}"
  fi
  say "installing Debian packages: ${missing[*]}"
  "${sudo[@]}" apt-get update -qq || fail "apt-get update failed; check the package mirror"
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null \
    || fail "apt-get install ${missing[*]} failed (run it by hand to see why): sudo apt-get install -y ${missing[*]}"
fi
command -v mpirun >/dev/null || fail "mpirun not found after installing openmpi-bin"

# 2. Python and the virtualenv.
"$PYTHON" -c 'import sys; assert (3, 10) <= sys.version_info[:2] <= (3, 11)' 2>/dev/null \
  || fail "$("$PYTHON" --version 2>&1) found; both stacks need Python 3.10 or 3.11 (set PYTHON=/path/to/python3.11)"
if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$venv" || fail "python -m venv failed; install the venv module (apt-get install python3-venv)"
  "${pip[@]}" install --upgrade pip setuptools wheel
fi

# 3. TensorFlow first: Horovod compiles against it. Another stack in this venv is converted, not half-mixed.
if [ "$gpu" = 1 ]; then tf_req="tensorflow[and-cuda]==$TF_VERSION"; else tf_req="tensorflow-cpu==$TF_VERSION"; fi
have_tf="$(py - 2>/dev/null <<'PY' || true
import importlib.metadata as m
for name in ("tensorflow-cpu", "tensorflow"):
    try:
        print(m.version(name)); break
    except m.PackageNotFoundError:
        pass
PY
)"
if [ "$have_tf" != "$TF_VERSION" ]; then
  if [ -n "$have_tf" ]; then say "$venv holds TensorFlow $have_tf: converting it to $tf_req"; else say "installing $tf_req"; fi
  rebuild=1  # Horovod must be rebuilt whenever TensorFlow changes
fi
# Always asked for: a no-op when complete, and it restores any missing dependency of TensorFlow.
"${pip[@]}" install "$tf_req" || fail "pip install $tf_req failed"
# What only the other stack uses (TF 2.15's estimator and Keras 2 packages), so the venv is not half-mixed.
leftovers=(); [ "$stack" = tf2.21 ] && leftovers=(tensorflow-estimator tf-keras)
for old in "${leftovers[@]}"; do
  if py -c "import importlib.metadata as m; m.version('$old')" 2>/dev/null; then "${pip[@]}" uninstall -y "$old"; fi
done
py -c "import keras, sys; sys.exit(int(keras.__version__.split('.')[0]) != $KERAS_MAJOR)" 2>/dev/null \
  || fail "$venv has Keras $(py -c 'import keras; print(keras.__version__)') but TensorFlow $TF_VERSION needs Keras $KERAS_MAJOR"

# serve (Ray Serve) on the current stack only: `hvdtrain serve` is tested there, and the TF 2.15 stack runs no serving tests.
extras="data,sweep,bench,docs,test"; [ "$stack" = tf2.21 ] && extras="$extras,serve"
say "installing hvdtrain (editable) with every extra: ${extras//,/, }"
extra=(); [ "$stack" = tf2.15 ] && extra=("tensorflow-metadata==1.16.1")  # newer ones import protobuf 5 APIs TF 2.15 lacks
"${pip[@]}" install --no-build-isolation -e ".[$extras]" "${extra[@]}" \
  || fail "pip install -e .[$extras] failed"

# 4. Horovod from the sdist (hash checked, patches applied), against this TensorFlow, with MPI and Gloo (+ NCCL on GPUs).
horovod_usable() {
  py - <<PY 2>/dev/null
import horovod, horovod.tensorflow as h
assert horovod.__version__ == "$HOROVOD_VERSION"
assert h.mpi_built() and h.gloo_built()
PY
}
build_horovod() {
  local work log="$venv/horovod-build.log"
  work="$(mktemp -d)"; trap 'rm -rf "$work"' RETURN
  pip_q download --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work" \
    || fail "could not download the horovod==$HOROVOD_VERSION sdist"
  local sdist="$work/horovod-$HOROVOD_VERSION.tar.gz"
  echo "$HOROVOD_SDIST_SHA256  $sdist" | sha256sum --check --quiet \
    || fail "horovod-$HOROVOD_VERSION.tar.gz has sha256 $(sha256sum "$sdist" | cut -d' ' -f1), expected $HOROVOD_SDIST_SHA256"
  tar xzf "$sdist" -C "$work"
  local patch_file
  for patch_file in "${PATCHES[@]}"; do
    patch -d "$work/horovod-$HOROVOD_VERSION" -p1 --forward --batch --dry-run --quiet < "$patch_file" >/dev/null \
      || fail "$patch_file does not apply to the horovod-$HOROVOD_VERSION sdist"
    patch -d "$work/horovod-$HOROVOD_VERSION" -p1 --forward --batch --quiet < "$patch_file"
    say "applied $patch_file"
  done
  local gpu_ops=(); [ "$gpu" = 1 ] && gpu_ops=(HOROVOD_GPU_OPERATIONS=NCCL)
  say "building horovod==$HOROVOD_VERSION for TensorFlow $TF_VERSION (2-4 minutes on 2 cores; log: $log)"
  if ! env HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 HOROVOD_WITHOUT_PYTORCH=1 \
         HOROVOD_WITHOUT_MXNET=1 HOROVOD_CMAKE_BUILD_TYPE=Release MAKEFLAGS="-j$(nproc)" "${gpu_ops[@]}" \
         "$venv/bin/python" -m pip --disable-pip-version-check install --no-cache-dir --no-build-isolation \
         --force-reinstall "$work/horovod-$HOROVOD_VERSION" >"$log" 2>&1; then
    grep -nE "error|Error|ERROR" "$log" | head -40 >&2 || true
    tail -40 "$log" >&2
    fail "building Horovod failed (the compiler errors are above; whole log: $log; needs g++, cmake, libopenmpi-dev)"
  fi
  # Read by `hvdtrain doctor`: this Horovod was built here, from which sources.
  build_record > "$venv/.hvdtrain-horovod-built"
}
# What a build here is made of: versions and each patch with its sha256, so that a changed patch means a rebuild.
build_record() {
  local patch_file patches=()
  for patch_file in "${PATCHES[@]}"; do patches+=("$patch_file@$(sha256sum "$patch_file" | cut -c1-12)"); done
  echo "horovod=$HOROVOD_VERSION tensorflow=$TF_VERSION gpu=$gpu patches=${patches[*]:-none}"
}
outdated() { [ -f "$venv/.hvdtrain-horovod-built" ] && [ "$(cat "$venv/.hvdtrain-horovod-built")" != "$(build_record)" ]; }
if [ "$rebuild" = 1 ] || ! horovod_usable; then
  build_horovod
elif outdated; then
  say "the Horovod in $venv was built from other sources than scripts/patches/ now holds: rebuilding it"
  build_horovod
elif [ ! -f "$venv/.hvdtrain-horovod-built" ]; then
  say "using the Horovod $HOROVOD_VERSION already installed in $venv (built against this TensorFlow)"
fi
horovod_usable || fail "Horovod does not load with TensorFlow $TF_VERSION after the build; see $venv/horovod-build.log"

# 5. Verify the build the way users will see it.
check="$("$venv/bin/horovodrun" --check-build 2>&1)" || fail "horovodrun --check-build failed: $check"
for want in TensorFlow MPI Gloo; do
  grep -Eq "\[X\] $want" <<<"$check" || fail "Horovod was built without $want (fix: scripts/install.sh --rebuild-horovod):
$check"
done
"$venv/bin/python" -m pip check >/dev/null 2>&1 || fail "pip check reports broken requirements in $venv: $("$venv/bin/python" -m pip check 2>&1 | head -5)"
"$venv/bin/hvdtrain" doctor >/dev/null 2>&1 || fail "hvdtrain doctor reports a problem; run $venv/bin/hvdtrain doctor"
echo "stack=$stack tensorflow=$TF_VERSION horovod=$HOROVOD_VERSION" > "$venv/.hvdtrain-installed"  # the Makefile's stamp
[ "$with_slurm" = 1 ] && touch "$venv/.hvdtrain-slurm"
say "ready in $venv: TensorFlow $TF_VERSION (Keras $KERAS_MAJOR), Horovod $HOROVOD_VERSION (TensorFlow, MPI, Gloo)$([ "$with_slurm" = 1 ] && echo ", Slurm")"
