"""`hvdtrain doctor`: what is installed, what Horovod was built with, what the launcher gives us."""
from __future__ import annotations

import os
import platform
import socket

from hvdtrain import dist, runtime
from hvdtrain.config import load_config
from hvdtrain.errors import UserError


def _mpi_library() -> str:
    try:
        from mpi4py import MPI
        return MPI.Get_library_version().splitlines()[0].strip()
    except Exception as exc:  # mpi4py missing or built against a different MPI: report, do not crash
        return f"unavailable ({exc})"


def run(config_path, overrides) -> int:
    problems = []
    cfg = load_config(config_path, overrides)
    import keras
    import tensorflow as tf
    print(f"python       {platform.python_version()} on {platform.platform()} ({os.cpu_count()} CPUs)")
    print(f"tensorflow   {tf.__version__} (keras {keras.__version__}), GPUs: {len(tf.config.list_physical_devices('GPU'))}")
    try:
        runtime.check_versions()
    except UserError as exc:
        problems.append(str(exc))
    try:
        info = dist.build_info()
    except Exception as exc:  # Horovod missing or its TensorFlow extension broken: that is the diagnosis
        info = None
        problems.append(f"Horovod is not usable with this TensorFlow ({exc}); run scripts/install.sh --rebuild-horovod")
    if info:
        ticks = lambda d: ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in d.items())
        print(f"horovod      {info['horovod']}")
        print(f"controllers  {ticks(info['controllers'])}")
        print(f"tensor ops   {ticks(info['tensor_operations'])}")
        if not (info["controllers"]["mpi"] or info["controllers"]["gloo"]):
            problems.append("Horovod has neither the MPI nor the Gloo controller; rebuild with HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1")
    print(f"mpi          {_mpi_library()}")
    for key, value in sorted(dist.comm_environment(cfg.runtime).items()):
        print(f"setting      {key}={value}")
    rt = cfg.runtime  # the thread defaults benchmarked in docs/benchmarks.md
    print(f"setting      threads per rank: intra-op {rt.intra_op_threads or 'CPU cores / ranks on the node'}, "
          f"inter-op {rt.inter_op_threads or 2}")
    if info and ("HOROVOD_RANK" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ or "PMIX_RANK" in os.environ):
        topo = dist.init(cfg.runtime)
        hosts = dist.allgather_object(socket.gethostname(), "hvdtrain.doctor.hosts")
        if topo.is_chief:
            print(f"ranks        {topo.size} ({topo.controller} controller) on hosts: {', '.join(sorted(set(hosts)))}")
    else:
        print("ranks        1 (not under a launcher; run `horovodrun -np 2 hvdtrain doctor` to check communication)")
    for problem in problems:
        print(f"PROBLEM      {problem}")
    return 1 if problems else 0
