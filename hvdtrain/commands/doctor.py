"""Checks the installation and prints: the stack (TensorFlow, Keras, which Horovod Keras layer), how Horovod was
installed and what it was built with, the MPI library, the communication settings this config applies, the threads
per rank, and (under a launcher) the ranks and hosts. Exits non-zero with advice when the setup is broken."""
from __future__ import annotations

import os
import platform
import socket
import sys
from pathlib import Path

HELP = "check the installation: stack, Horovod build, MPI, settings, ranks and hosts"


def add_arguments(parser) -> None:
    parser.add_argument("--config", metavar="FILE", help="show the communication settings this config would apply")


def run(args, overrides) -> int:
    from hvdtrain import backend, runtime
    from hvdtrain.config import load_config
    from hvdtrain.errors import UserError
    problems = []
    cfg = load_config(args.config, overrides)
    tf = runtime.import_tensorflow()
    import keras
    print(f"python       {platform.python_version()} on {platform.platform()} ({os.cpu_count()} CPUs)")
    print(f"tensorflow   {tf.__version__} (keras {keras.__version__}), GPUs: {len(tf.config.list_physical_devices('GPU'))}")
    try:
        stack = runtime.stack()
        print(f"stack        {stack}: {backend.integration()}")
    except UserError as exc:
        problems.append(str(exc))
    try:
        info = backend.build_info()
    except Exception as exc:  # Horovod missing or its TensorFlow extension broken: that is the diagnosis
        info = None
        problems.append(f"Horovod is not usable with this TensorFlow ({exc}); run scripts/install.sh --rebuild-horovod")
    if info:
        ticks = lambda d: ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in d.items())  # noqa: E731
        print(f"horovod      {info['horovod']} ({_provenance()})")
        print(f"controllers  {ticks(info['controllers'])}")
        print(f"tensor ops   {ticks(info['tensor_operations'])}")
        if not (info["controllers"]["mpi"] or info["controllers"]["gloo"]):
            problems.append("Horovod has neither the MPI nor the Gloo controller; rebuild with HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1")
    print(f"mpi          {backend.mpi_library_version()}")
    for key, value in sorted(backend.comm_environment(cfg.runtime).items()):
        print(f"setting      {key}={value}")
    intra, inter = runtime.threads(cfg.runtime, backend.local_size_hint())
    print(f"setting      threads per rank: intra-op {cfg.runtime.intra_op_threads or f'{intra} (CPU cores / ranks on the node)'}, "
          f"inter-op {inter}")
    if info and backend.under_launcher():
        from hvdtrain import world
        w = world.start(cfg.runtime, configure=False)
        hosts = backend.allgather_object(socket.gethostname(), "hvdtrain.doctor.hosts")
        if w.is_chief:
            print(f"ranks        {w.size} ({w.controller} controller, launched by {backend.launcher_name()}) on hosts: "
                  f"{', '.join(sorted(set(hosts)))}")
    else:
        print("ranks        1 (not under a launcher; run `horovodrun -np 2 hvdtrain doctor` to check communication)")
    for problem in problems:
        print(f"PROBLEM      {problem}")
    return 1 if problems else 0


def _provenance() -> str:
    """Built here by scripts/install.sh (which writes a marker into the virtualenv), or found installed."""
    marker = Path(sys.prefix) / ".hvdtrain-horovod-built"
    if marker.is_file():
        return "built from source by scripts/install.sh: " + marker.read_text().strip()
    return "found installed in this environment; hvdtrain uses it as it is"
