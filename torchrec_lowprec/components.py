"""TorchX components of torchrec-lowprec, registered under the ``torchx.components`` entry point.

With the package installed (``pip install 'torchrec-lowprec[examples]'``), from any directory::

    torchx run -s local_cwd torchrec_lowprec.dlrm -j 1x2 -- --precision int8 --summary runs/int8.json
    torchx run -s local_cwd torchrec_lowprec.dlrm -j 1x2 -- --checkpoint-dir runs/ckpt --checkpoint-every 500

Everything after ``--`` goes to the DLRM example trainer (``python -m
torchrec_lowprec_examples.dlrm.train --help``). torchrun restarts the workers up to
``--max_restarts`` times when a rank dies; with ``--checkpoint-dir`` the trainer is given
``--resume auto``, so a restart continues from the newest complete checkpoint (a first start
finds none and starts fresh). Without ``--checkpoint-dir`` a restart trains from step 0.

Multi-node, 2 nodes x 8 GPUs: ``torchx run -s slurm torchrec_lowprec.dlrm -j 2x8 --gpu 8 -- ...``;
the image / the nodes must have the package installed (the trainer runs as a module).

The package registers this module under the name ``torchrec_lowprec`` and, because TorchX
lists its builtins only when no package registers components, also re-registers
``torchx.components`` itself, so ``dist.ddp`` and the other builtins keep their names.
"""

from typing import Dict, List, Optional  # noqa: UP035 -- torchx's component linter reads these names

from torchx import specs
from torchx.components import dist

#: The example trainer as installed (``examples/dlrm`` of the checkout, packaged under this name).
DLRM_MODULE = "torchrec_lowprec_examples.dlrm.train"


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
    script: Optional[str] = None,  # noqa: UP045
    rdzv_port: int = 29500,
    rdzv_backend: str = "c10d",
    mounts: Optional[List[str]] = None,  # noqa: UP006, UP045
    debug: bool = False,
) -> specs.AppDef:
    """Train TorchRec's DLRM with low-precision tables under torchrun, restarting dead ranks.

    One process per slot of ``-j``; with more than one, the trainer shards the tables with
    DistributedModelParallel and TorchRec's planner (gloo on CPU, nccl on GPU).

    Args:
        script_args: arguments of the trainer (after ``--``), e.g. ``--precision int4``
        j: ``{nnodes}x{nproc_per_node}``, e.g. 1x2 (two local processes) or 2x8 (2 nodes, 8 each)
        cpu: CPUs per node (ignored by local_cwd)
        gpu: GPUs per node; with GPUs use one process per GPU (``-j Nx<gpu>``)
        memMB: memory per node in MB (ignored by local_cwd)
        h: a named resource of the scheduler instead of cpu/gpu/memMB
        image: container image with the package installed (kubernetes)
        name: job name
        env: extra environment variables, e.g. ``--env OMP_NUM_THREADS=1``
        max_restarts: times torchrun restarts all workers after one fails (with
            ``--checkpoint-dir`` they resume from the newest complete checkpoint)
        max_retries: times the scheduler resubmits the whole job (not local_cwd)
        script: run this trainer file instead of the installed module (e.g. a checkout's
            examples/dlrm/train.py)
        rdzv_port: port of the c10d rendezvous on the rank-0 node (multi-node)
        rdzv_backend: torchrun rendezvous backend
        mounts: volumes to mount (see torchx.specs.parse_mounts)
        debug: verbose torch.distributed logging
    """
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
    args = list(script_args)
    if _has_flag(args, "--checkpoint-dir") and not _has_flag(args, "--resume"):
        args += ["--resume", "auto"]
    app = dist.ddp(
        *args,
        script=script,
        m=None if script else DLRM_MODULE,
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
    role = app.roles[0]
    cmd = role.args[-1]
    if not cmd.startswith("torchrun "):  # the form of torchx.components.dist.ddp (0.7)
        raise RuntimeError(f"unexpected torchx ddp command {cmd!r}: cannot add --max-restarts")
    role.args[-1] = f"torchrun --max-restarts {max_restarts} " + cmd[len("torchrun ") :]
    return app


def _has_flag(args: List[str], flag: str) -> bool:  # noqa: UP006
    return any(a == flag or a.startswith(flag + "=") for a in args)
