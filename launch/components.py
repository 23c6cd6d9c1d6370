"""TorchX components of a torchrec-lowprec checkout: the packaged ones, running the checkout's files.

Run the DLRM example on 2 local CPU processes (``torchrun`` must be on PATH, e.g. the venv's)::

    PATH=$PWD/.venv/bin:$PATH torchx run -s local_cwd launch/components.py:dlrm -j 1x2 -- \\
        --precision int8 --summary runs/dlrm_int8.json

Everything after ``--`` goes to ``examples/dlrm/train.py`` (see its ``--help``). Multi-node,
2 nodes x 8 GPUs (nccl, one process per GPU; the scheduler provides the rank-0 host)::

    torchx run -s slurm launch/components.py:dlrm -j 2x8 --gpu 8 --cpu 64 --memMB 400000 -- --precision int4

On Slurm the job runs in the submitting directory, which must be this repository on a shared
filesystem. With the package installed, ``torchx run torchrec_lowprec.dlrm`` (the same
component, registered by name) runs the installed copy of the trainer from any directory:
see :mod:`torchrec_lowprec.components` for the restart policy (``--max_restarts``, default 3,
and ``--resume auto`` when ``--checkpoint-dir`` is given). ``--batch-size`` is the global
batch, split over all ranks.
"""

from typing import Dict, List, Optional  # noqa: UP035 -- torchx's component linter reads these names

from torchx import specs

from torchrec_lowprec import components

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
    max_restarts: int = 3,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    rdzv_backend: str = "c10d",
    mounts: Optional[List[str]] = None,  # noqa: UP006, UP045
    debug: bool = False,
) -> specs.AppDef:
    """Train TorchRec's DLRM with low-precision tables (examples/dlrm/train.py) under torchrun.

    The checkout-local face of ``torchrec_lowprec.components.dlrm``: the same AppDef, running
    this checkout's ``examples/dlrm/train.py`` (the working directory must be the checkout).

    Args:
        script_args: arguments of examples/dlrm/train.py (after ``--``), e.g. ``--precision int4``
        j: ``{nnodes}x{nproc_per_node}``, e.g. 1x2 (two local processes) or 2x8 (2 nodes, 8 each)
        cpu: CPUs per node (ignored by local_cwd)
        gpu: GPUs per node; with GPUs use one process per GPU (``-j Nx<gpu>``)
        memMB: memory per node in MB (ignored by local_cwd)
        h: a named resource of the scheduler instead of cpu/gpu/memMB
        image: container image holding this repository (kubernetes)
        name: job name
        env: extra environment variables, e.g. ``--env OMP_NUM_THREADS=1``
        max_restarts: times torchrun restarts all workers after one fails (with
            ``--checkpoint-dir`` they resume from the newest complete checkpoint)
        max_retries: times the scheduler resubmits the whole job (not local_cwd)
        rdzv_port: port of the c10d rendezvous on the rank-0 node (multi-node)
        rdzv_backend: torchrun rendezvous backend
        mounts: volumes to mount (see torchx.specs.parse_mounts)
        debug: verbose torch.distributed logging
    """
    return components.dlrm(
        *script_args, j=j, cpu=cpu, gpu=gpu, memMB=memMB, h=h, image=image, name=name, env=env,
        max_restarts=max_restarts, max_retries=max_retries, script=DLRM_SCRIPT, rdzv_port=rdzv_port,
        rdzv_backend=rdzv_backend, mounts=mounts, debug=debug,
    )  # fmt: skip
