# Shared by the slurm/*.sbatch scripts (sourced, not run): the cluster settings and the job-step launcher.
# Site settings belong here, in one place, not in Python. Each can also be exported before `sbatch`: sbatch passes
# the submitting shell's environment on, and a value already set is kept.
#
# Launchers (HVDTRAIN_LAUNCHER):
#   srun     (default) srun --mpi=pmix: Slurm starts every rank itself; needs Slurm built with PMIx (`srun --mpi=list`)
#   mpirun   sites without PMIx: OpenMPI's mpirun with a host list built from the allocation (slots = tasks per node)

# --- where hvdtrain is -------------------------------------------------------------------------------------------
# The virtualenv holding hvdtrain, on the same path on every node. `hvdtrain slurm submit` sets it; with plain sbatch,
# activate the virtualenv first (sbatch passes PATH on) or export HVDTRAIN_VENV=/path/to/.venv.
if [ -n "${HVDTRAIN_VENV:-}" ]; then export PATH="$HVDTRAIN_VENV/bin:$PATH"; fi
command -v hvdtrain >/dev/null || {
  echo "[slurm] error: hvdtrain is not on PATH on $(hostname -s); activate its virtualenv before sbatch or export HVDTRAIN_VENV" >&2
  exit 2
}

# --- output ------------------------------------------------------------------------------------------------------
# Python writes each line as it happens, so the job log (--output) can be followed with `tail -f`.
export PYTHONUNBUFFERED=1
# TensorFlow's C++ start-up banners hide the interesting lines; 0 shows them again.
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

# --- CPUs and binding --------------------------------------------------------------------------------------------
# Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch: pass it on, or every rank gets one core.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"; fi
# Binding: with TaskPlugin=task/affinity or task/cgroup Slurm already binds each rank to its own cores. To choose
# explicitly (`srun --cpu-bind=help` lists the forms; `verbose,cores` prints each rank's mask into the log):
# export SLURM_CPU_BIND=cores
# One rank dying (e.g. a node failure) ends the whole step at once instead of leaving the others blocked in a collective.
export SLURM_KILL_BAD_EXIT="${SLURM_KILL_BAD_EXIT:-1}"

# --- GPUs --------------------------------------------------------------------------------------------------------
# Every rank sees all GPUs of its node and pins the one of its local rank (hvdtrain/backend/). --gpus-per-task alone
# would make srun hide all but one GPU from each rank (implicit --gpu-bind=per_task:1).
export SLURM_GPU_BIND="${SLURM_GPU_BIND:-none}"
# NCCL (GPU all-reduce): warnings only; INFO prints the transport it chose (IB, socket) when a job is slow.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Nodes with several networks: the interface NCCL must use between nodes (see `ip -br addr`), e.g. ib0 or ens1f0.
# export NCCL_SOCKET_IFNAME=ib0
# InfiniBand stays on; 1 turns it off, only to rule it out while debugging a hang.
# export NCCL_IB_DISABLE=0

# --- Horovod -----------------------------------------------------------------------------------------------------
# hvdtrain sets HOROVOD_CYCLE_TIME, HOROVOD_FUSION_THRESHOLD, HOROVOD_CPU_OPERATIONS and the stall timeouts from the
# config (runtime.*). A value exported here or before sbatch WINS over the config (hvdtrain/backend/ comm_environment).
# Multi-node GPU jobs: all-reduce within a node over NCCL, across nodes over MPI; try it on slow inter-node links.
# export HOROVOD_HIERARCHICAL_ALLREDUCE=1
# Profile one run: a Chrome-trace timeline of every collective (rank 0 writes it).
# export HOROVOD_TIMELINE="$SLURM_SUBMIT_DIR/timeline-$SLURM_JOB_ID.json"

# OpenMPI's mpirun refuses to start ranks as root unless told (containers and small clusters often run as root).
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi

# --- launching ---------------------------------------------------------------------------------------------------
# The command that starts one process per task of the allocation, in the array `step`.
step_command() {
  case "${HVDTRAIN_LAUNCHER:-srun}" in
    srun)
      # Each rank fetches the job's PMIx data by message rather than from PMIx's shared-memory store (gds ds21),
      # which has a history of rare segfaults at start-up (openpmix#1114, ompi#7335). Cost: a little start-up time
      # on very large jobs. Export PMIX_MCA_gds=ds21 before sbatch to use the store again.
      export PMIX_MCA_gds="${PMIX_MCA_gds:-hash}"
      step=(srun --mpi=pmix "$@") ;;
    mpirun)
      # host1:4,host2:4 from the allocation; OpenMPI starts its daemons on the nodes through Slurm (no ssh).
      local slots="${SLURM_NTASKS_PER_NODE:?mpirun needs --ntasks-per-node}" hosts
      hosts="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/:$slots/" | paste -sd, -)"
      # mpirun passes on only the variables named with -x: the ones set above, and any NCCL_*/HOROVOD_* ones.
      local exported=() name
      for name in PATH LD_LIBRARY_PATH PYTHONUNBUFFERED TF_CPP_MIN_LOG_LEVEL $(compgen -e | grep -E '^(NCCL|HOROVOD)_' || true); do
        if [ -n "${!name+set}" ]; then exported+=(-x "$name"); fi
      done
      step=(mpirun -np "$SLURM_NTASKS" -H "$hosts" --bind-to none --map-by slot "${exported[@]}" "$@") ;;
    *) echo "[slurm] error: HVDTRAIN_LAUNCHER must be srun or mpirun, got '$HVDTRAIN_LAUNCHER'" >&2; exit 2 ;;
  esac
}

# Run the job step in the background so this shell stays free to catch signals while it runs:
#  - USR1 (sent by Slurm --signal=B:USR1@<s> before the time limit, or `scancel --signal=USR1 --batch`): forwarded to
#    every rank; the ranks agree on a step, stop there, rank 0 writes a checkpoint and they exit 0. Then the job is
#    requeued, and the requeued run resumes from that checkpoint (trainer.resume=auto).
#  - TERM (scancel, preemption): Slurm sends it to every rank itself (forwarding it again would make srun kill the
#    step at once); this shell only keeps waiting, so the ranks can checkpoint before Slurm's KillWait ends. No
#    requeue here: Slurm requeues preempted jobs itself, and a cancelled job should stay cancelled.
#  - A node failing (it stops answering): Slurm ends the job as NODE_FAIL, this script with it ("CANCELLED ... DUE TO
#    NODE FAILURE"), and requeues it itself (--requeue); the next run resumes from the last checkpoint. A requeued run
#    reuses the job id and step ids from 0, so it must not start on a node that still holds the old step: the site's
#    requeue delay (AuthInfo cred_expire, Slurm's default 120 s) gives a node that is back the time to end it.
# srun and mpirun both forward the signals they receive to all their tasks.
run_step() {
  local status=0 pid=""
  step_command "$@"
  echo "[slurm] job ${SLURM_JOB_ID:-?} run $((${SLURM_RESTART_COUNT:-0} + 1)) on ${SLURM_JOB_NODELIST:-?}:" \
       "${SLURM_NTASKS:-?} tasks (${SLURM_NTASKS_PER_NODE:-?} per node), launcher ${HVDTRAIN_LAUNCHER:-srun}: $(printf '%q ' "$@")"
  stop_signal=""
  trap 'stop_signal=USR1; echo "[slurm] USR1: all ranks stop at an agreed step and checkpoint; the job will be requeued"; [ -z "$pid" ] || kill -USR1 "$pid" 2>/dev/null || true' USR1
  trap 'stop_signal=TERM; echo "[slurm] TERM: waiting for the ranks to stop at an agreed step and checkpoint"' TERM
  "${step[@]}" &
  pid=$!
  while :; do
    status=0
    wait "$pid" || status=$?
    # `wait` also returns when a trapped signal arrives; only a step that has ended is gone.
    kill -0 "$pid" 2>/dev/null || break
  done
  trap - USR1 TERM
  echo "[slurm] job step ended with exit code $status"
  if [ "$stop_signal" = USR1 ] && [ "$status" = 0 ]; then
    echo "[slurm] requeueing job $SLURM_JOB_ID; it resumes from the checkpoint just written"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$status"
}
