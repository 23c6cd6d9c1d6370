"""``torchrec-lowprec``: command-line entry points.

torchrec-lowprec plan --tables tables.yaml --world-size 8 --hbm-gb 40 --out plan.json
torchrec-lowprec build-kernels

Importing this module imports neither torch nor torchrec: ``--help`` works with only the
package installed, and a subcommand that needs the stack says how to install it.
"""

from __future__ import annotations

import argparse
import sys

from torchrec_lowprec.files import unwritable_reason
from torchrec_lowprec.types import PLAN_BITS, SUPPORTED_BITS, OptimizerType

TABLES_HELP = """\
file formats:
  --tables (YAML or JSON): a list of tables, or {"tables": [...]}; each table has
      name: t_user            (required; a string without '.')
      rows: 40000000          (required; a whole number; alias num_embeddings)
      dim: 128                (required; a whole number; alias embedding_dim)
      features: [user_id]     (optional; a list, even for one feature; default [name];
                               alias feature_names)
      pooling: sum | mean | none  (optional; default sum; none: a sequence table of an
                               EmbeddingCollection, one width per table, needs
                               --sequence-module-path)
      Other keys are errors (TorchRec's names above are accepted as aliases).
  --frequencies: a file written by torchrec_lowprec.data.save_frequencies (feature -> per-id
      counts from the training split; every feature must be read by a table, one whole count
      >= 0 per row); tables are then split into --groups frequency groups
      and rare groups are lowered first. Ids must then be frequency-ranked by the data
      pipeline (torchrec_lowprec.data.remap_by_rank), or pass --remap-in-module.
  --precision-plan: a PrecisionPlan JSON (MPE's selection, or a previous plan.json): the
      starting precision, only ever lowered; it may name only tables of --tables.
  --out: JSON with "precision" (the PrecisionPlan; pass it to lp.convert(model, cfg,
      precision_plan=...)) and "sharding" (TorchRec's plan for DistributedModelParallel, keyed
      by --module-path + ".row_groups", sequence tables by --sequence-module-path); load both
      with torchrec_lowprec.planner.MemoryPlan.load.

exit status: 0 planned; 2 bad arguments or file; 3 the budget cannot be met (the message
gives the smallest bytes per rank that would fit).
"""


def _fail(msg: str, code: int = 2) -> int:
    print(f"torchrec-lowprec: error: {msg}", file=sys.stderr)
    return code


def read_tables(path: str) -> list:
    """Table configs from a YAML/JSON file (format in ``TABLES_HELP``); ``ValueError`` if malformed."""
    from torchrec_lowprec.planner.tables_file import read_tables as read

    return read(path)


def _plan_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="bit widths + TorchRec sharding plan that fit a memory budget",
        description="Plan per-table / per-group precision and sharding so the tables fit a memory budget per rank.",
        epilog=TABLES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tables", required=True, help="YAML/JSON table list (format below)")
    p.add_argument("--world-size", type=int, required=True, help="number of ranks (GPUs; at most 4096)")
    p.add_argument("--hbm-gb", type=float, help="memory per rank in GiB (GPU HBM; for --device cpu: DDR)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="compute device (default cuda)")
    p.add_argument("--frequencies", help="per-id counts (torchrec_lowprec.data.save_frequencies)")
    p.add_argument("--precision-plan", help="starting PrecisionPlan JSON (e.g. MPE's selection)")
    p.add_argument("--groups", type=int, default=16, help="frequency groups per table with --frequencies")
    p.add_argument("--min-bits", type=int, default=2, choices=PLAN_BITS, help="floor (0 allows pruning)")
    p.add_argument("--max-bits", type=int, default=32, choices=SUPPORTED_BITS, help="ceiling")
    p.add_argument(
        "--optimizer", default=OptimizerType.ROWWISE_ADAGRAD.value, choices=[o.value for o in OptimizerType]
    )
    p.add_argument("--no-learn-step-size", action="store_true", help="LPT (no fp32 master step per row)")
    p.add_argument("--batch-size", type=int, default=512, help="per-rank batch size (I/O estimate)")
    p.add_argument("--reserved-fraction", type=float, default=0.15, help="memory kept for dense parts")
    p.add_argument("--module-path", default="", help="the collection's path in the model (keys the plan)")
    p.add_argument(
        "--sequence-module-path",
        default="",
        help="the EmbeddingCollection's path in the model (keys the plan of the pooling: none tables)",
    )
    p.add_argument(
        "--remap-in-module", action="store_true", help="ids are raw: keep a 4 B/row id map per table"
    )
    p.add_argument("--out", required=True, help="output plan JSON")


def _run_plan(args: argparse.Namespace) -> int:
    import torch
    from torchrec.distributed.planner import Topology

    from torchrec_lowprec.configs import LowPrecisionConfig
    from torchrec_lowprec.data.frequencies import load_frequencies
    from torchrec_lowprec.planner import GiB, InfeasibleBudgetError, plan_precision, tables_file
    from torchrec_lowprec.planner.schema import PrecisionPlan

    try:
        tables_file.check_plan_args(
            args.world_size, args.hbm_gb, args.batch_size, args.reserved_fraction, args.groups, args.out
        )
        if why := unwritable_reason(args.out):  # before planning (minutes), not when saving
            raise ValueError(f"--out {args.out}: {why}")
        tables = tables_file.read_tables(args.tables)
        freqs = load_frequencies(args.frequencies) if args.frequencies else None
        if freqs is not None:
            freqs = tables_file.check_frequencies(freqs, tables, args.frequencies)
        start = PrecisionPlan.load(args.precision_plan) if args.precision_plan else None
        if start is not None:
            tables_file.check_precision_plan(start, tables, args.precision_plan)
    except (OSError, ValueError) as e:
        return _fail(str(e))
    cap = int(args.hbm_gb * GiB)
    caps = {"hbm_cap": cap} if args.device == "cuda" else {"hbm_cap": 0, "ddr_cap": cap}
    topo = Topology(
        world_size=args.world_size,
        compute_device=args.device,
        local_world_size=min(args.world_size, 8),
        **caps,
    )
    cfg = LowPrecisionConfig(optimizer=args.optimizer, learn_step_size=not args.no_learn_step_size)
    try:
        with torch.no_grad():
            mp = plan_precision(
                tables, topo, cfg, batch_size=args.batch_size, precision_plan=start, frequencies=freqs,
                num_groups=args.groups, min_bits=args.min_bits, max_bits=args.max_bits,
                reserved_fraction=args.reserved_fraction, module_path=args.module_path,
                remap_in_module=args.remap_in_module, sequence_module_path=args.sequence_module_path,
            )  # fmt: skip
    except InfeasibleBudgetError as e:
        return _fail(str(e), 3)
    except ValueError as e:
        return _fail(str(e))
    print(mp.summary())
    try:
        mp.save(args.out)
    except OSError as e:  # writable when checked: the disk filled up since
        return _fail(f"--out {args.out}: writing the plan failed: {e}")
    print(f"\nwrote {args.out}")
    return 0


#: The stack a subcommand needs (import names) and how a pip user installs it.
STACK_MODULES = ("torch", "torchrec", "fbgemm_gpu")
STACK_INSTALL = (
    "pip install 'torchrec-lowprec[cuda]' (GPU), or on CPU: pip install torch==2.13.* --index-url "
    "https://download.pytorch.org/whl/cpu && pip install 'torchrec-lowprec[cpu]' && "
    "pip install --no-deps torchrec==1.8.0"
)
KERNELS_INSTALL = "pip install 'torchrec-lowprec[kernels]' (ninja) and a C++ compiler (e.g. apt install g++)"


def _build_kernels_parser(sub) -> None:
    sub.add_parser(
        "build-kernels",
        help="build the native CPU kernel now (else it is built on first use) and print its path",
        description=(
            "Compile the native CPU fused update (kernels/cpu/fused_update.cpp) into the cache "
            "($TORCHREC_LOWPREC_EXT_DIR, default ~/.cache/torchrec_lowprec) and print the library's "
            "path. Needs torch, ninja and a C++ compiler. Exit status 0 built (or already there), "
            "1 the build failed, 2 the stack is missing."
        ),
    )


def _run_build_kernels(args: argparse.Namespace) -> int:
    from torchrec_lowprec.kernels import cpu_native

    print(f"building the native CPU kernel in {cpu_native.build_dir()} (a minute or so the first time)",
          file=sys.stderr, flush=True)  # fmt: skip
    if not cpu_native.is_available():
        return _fail(
            f"building the native CPU kernel failed: {cpu_native.load_error()}; {KERNELS_INSTALL}", 1
        )
    print(cpu_native.library_path())
    return 0


def _version_line() -> str:
    from torchrec_lowprec import __version__
    from torchrec_lowprec._versions import installed_versions

    stack = ", ".join(f"{k} {v or 'not installed'}" for k, v in installed_versions().items())
    return f"torchrec-lowprec {__version__} ({stack})"


def main(argv: list[str] | None = None) -> int:
    """Run the ``torchrec-lowprec`` command line; returns the exit status."""
    import logging

    # TorchRec's planner logs advisory warnings about directly built topologies and dry runs.
    logging.getLogger("torchrec.distributed.planner").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(
        prog="torchrec-lowprec",
        description="Plan and prepare low-precision TorchRec embedding tables.",
        epilog=(
            "The subcommands need torch, torchrec and fbgemm-gpu (--help does not):\n"
            "  GPU: pip install 'torchrec-lowprec[cuda]'\n"
            "  CPU: pip install torch==2.13.* --index-url https://download.pytorch.org/whl/cpu\n"
            "       pip install 'torchrec-lowprec[cpu]'\n"
            "       pip install --no-deps torchrec==1.8.0   (torchrec's own requirement is the CUDA fbgemm-gpu)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version_line())
    sub = parser.add_subparsers(dest="command", required=True)
    _plan_parser(sub)
    _build_kernels_parser(sub)
    args = parser.parse_args(argv)
    run = {"plan": _run_plan, "build-kernels": _run_build_kernels}.get(args.command)
    if run is None:
        return _fail(f"unknown command {args.command}")
    try:
        return run(args)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in STACK_MODULES:
            raise
        return _fail(
            f"'{args.command}' needs torch, torchrec and fbgemm-gpu ({e}); install them: {STACK_INSTALL}"
        )


if __name__ == "__main__":
    sys.exit(main())
