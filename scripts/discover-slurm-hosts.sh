#!/usr/bin/env bash
# Horovod Elastic host discovery inside a Slurm allocation: the allocation's nodes that Slurm still reports as
# responsive, each with the job's tasks per node as slots. Use from an sbatch script:
#   horovodrun --gloo --min-np 1 --max-np "$SLURM_NTASKS" --host-discovery-script scripts/discover-slurm-hosts.sh ...
set -euo pipefail
: "${SLURM_JOB_NODELIST:?discover-slurm-hosts.sh runs inside a Slurm job (SLURM_JOB_NODELIST is not set)}"
slots="${SLURM_NTASKS_PER_NODE:-1}"
slots="${slots%%(*}"                       # "2(x3)" -> "2"
for host in $(scontrol show hostnames "$SLURM_JOB_NODELIST"); do
  state="$(sinfo -h -n "$host" -o %t 2>/dev/null || echo unknown)"
  case "$state" in down*|drain*|fail*|unk*|no_respond*|*'*') continue ;; esac   # skip nodes Slurm lost
  echo "$host:$slots"
done
