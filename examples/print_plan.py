"""Print the sharding plan TorchRec's planner makes for a DLRM whose tables are int8/int4.

    python examples/print_plan.py [--world-size 2] [--compute-device cpu|cuda]

Planning needs no process group; the plan is what ``collective_plan`` would return on rank 0.
"""

from __future__ import annotations

import argparse

import torch
import torchrec
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.models.dlrm import DLRM

import torchrec_lowprec as lp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--compute-device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    tables = [
        torchrec.EmbeddingBagConfig(name=f"t_{n}", embedding_dim=64, num_embeddings=r, feature_names=[n])
        for n, r in [("user", 2_000_000), ("item", 500_000), ("city", 10_000), ("device", 100)]
    ]
    ebc = torchrec.EmbeddingBagCollection(tables, device=torch.device("meta"))
    model = DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=13,
        dense_arch_layer_sizes=[128, 64],
        over_arch_layer_sizes=[64, 1],
    )
    lp.convert(
        model,
        lp.PerTableConfig({"t_user": lp.LowPrecisionConfig(bits=4)}, default=lp.LowPrecisionConfig(bits=8)),
    )
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=args.world_size, compute_device=args.compute_device)
    )
    plan = planner.plan(model, lp.sharders())
    ebc = model.sparse_arch.embedding_bag_collection
    print(
        f"module sparse_arch.embedding_bag_collection ({type(ebc).__name__}), {args.world_size} x {args.compute_device}"
    )
    print(f"{'table':<10} {'rows':>10} {'dim':>4} {'bits':>4} {'sharding':<18} {'kernel':<7} ranks")
    for name, ps in plan.get_plan_for_module("sparse_arch.embedding_bag_collection").items():
        t = next(t for t in tables if t.name == name)
        print(
            f"{name:<10} {t.num_embeddings:>10} {t.embedding_dim:>4} {ebc.table_config(name).bits:>4} {ps.sharding_type:<18} {ps.compute_kernel:<7} {ps.ranks}"
        )


if __name__ == "__main__":
    main()
