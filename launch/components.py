"""TorchX components of torchrec-lowprec.

Run the DLRM example on 2 local CPU processes (``torchrun`` must be on PATH, e.g. the venv's)::

    PATH=$PWD/.venv/bin:$PATH torchx run -s local_cwd launch/components.py:dlrm -j 1x2 -- \\
        --precision int8 --summary runs/dlrm_int8.json

Everything after ``--`` goes to ``examples/dlrm/train.py`` (see its ``--help``). Multi-node,
2 nodes x 8 GPUs (nccl, one process per GPU; the scheduler provides the rank-0 host)::

    torchx run -s slurm launch/components.py:dlrm -j 2x8 --gpu 8 --cpu 64 --memMB 400000 -- --precision int4
    torchx run -s kubernetes launch/components.py:dlrm -j 2x8 --gpu 8 --image REGISTRY/torchrec-lowprec:TAG -- ...

On Kubernetes the image must hold this repository installed (``make setup``) with the
working directory at its root; on Slurm the job runs in the submitting directory, which must
be this repository on a shared filesystem. ``--batch-size`` is the global batch, split over
all ranks.
"""

from typing import Dict, List, Optional  # noqa: UP035 -- torchx's component linter reads these names

from torchx import specs
from torchx.components import dist

DLRM_SCRIPT = "examples/dlrm/train.py"


def dlrm(
    *script_args: str,
    j: str = "1x2",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,  # noqa: UP045
    image: str = "torchrec-lowprec:latest",
    name: str = "dlrm",
    env: Optional[Dict[str, str]] = None,  # noqa: UP006, UP045
    max_retries: int = 0,
    rdzv_port: int = 29500,
    rdzv_backend: str = "c10d",
    mounts: Optional[List[str]] = None,  # noqa: UP006, UP045
    debug: bool = False,
) -> specs.AppDef:
    """Train TorchRec's DLRM with low-precision tables (examples/dlrm/train.py) under torchrun.

    One process per slot of ``-j``; with more than one, the script shards the tables with
    DistributedModelParallel and TorchRec's planner (gloo on CPU, nccl on GPU) and every rank
    reads its own slice of each global batch.

    Args:
        script_args: arguments of examples/dlrm/train.py (after ``--``), e.g. ``--precision int4``
        j: ``{nnodes}x{nproc_per_node}``, e.g. 1x2 (two local processes) or 2x8 (2 nodes, 8 each)
        cpu: CPUs per node (ignored by local_cwd)
        gpu: GPUs per node; with GPUs use one process per GPU (``-j Nx<gpu>``)
        memMB: memory per node in MB (ignored by local_cwd)
        h: a named resource of the scheduler instead of cpu/gpu/memMB
        image: container image holding this repository (kubernetes); local_cwd and slurm run
            in the current directory
        name: job name
        env: extra environment variables, e.g. ``--env OMP_NUM_THREADS=1``
        max_retries: times the scheduler restarts a failed job (pair with the script's
            ``--checkpoint-dir ... --resume`` so a restart continues training)
        rdzv_port: port of the c10d rendezvous on the rank-0 node (multi-node)
        rdzv_backend: torchrun rendezvous backend
        mounts: volumes to mount (see torchx.specs.parse_mounts)
        debug: verbose torch.distributed logging
    """
    return dist.ddp(
        *script_args,
        script=DLRM_SCRIPT,
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        env=env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        rdzv_backend=rdzv_backend,
        mounts=mounts,
        debug=debug,
    )
