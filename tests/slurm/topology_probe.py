"""`hvdtrain` as the Slurm jobs run it, plus a record of where each rank landed.

The tests put a `hvdtrain` wrapper first on PATH that runs this file: it records, for every rank, Horovod's view
of the topology (rank, local_rank, local_size, cross_rank, cross_size) next to Slurm's (SLURM_PROCID, SLURM_LOCALID,
SLURM_NODEID), the host name and the PMIx data store it was given (PMIX_MCA_gds), in
$HVDTRAIN_TOPOLOGY_DIR/rank-<rank>.json, then goes on exactly as `hvdtrain` would. The training itself is
untouched: the record is written right after hvdtrain's own backend.init().
"""
import json
import os
import socket
import sys
from pathlib import Path

from hvdtrain import backend, cli

_init = backend.init


def _recording_init(*args, **kwargs):
    topo = _init(*args, **kwargs)
    out = Path(os.environ["HVDTRAIN_TOPOLOGY_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    keys = ("rank", "size", "local_rank", "local_size", "cross_rank", "cross_size")
    record = {"host": socket.gethostname(), **{k: topo[k] for k in keys},
              **{k.lower(): int(os.environ[k]) for k in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID")},
              "pmix_gds": os.environ.get("PMIX_MCA_gds")}
    (out / f"rank-{topo['rank']}.json").write_text(json.dumps(record))
    return topo


backend.init = _recording_init

if __name__ == "__main__":
    sys.exit(cli.main())
