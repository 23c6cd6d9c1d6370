"""TorchRec ``ShardingPlan`` <-> JSON, so a plan travels with its precision plan in one file."""

from __future__ import annotations

from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
from torchrec.distributed.types import EmbeddingModuleShardingPlan, ParameterSharding, ShardingPlan


def sharding_plan_to_dict(plan: ShardingPlan) -> dict:
    """``{module_path: {table: {sharding_type, compute_kernel, ranks, shards}}}``."""
    out: dict = {}
    for path, module_plan in plan.plan.items():
        tables = {}
        for name, ps in module_plan.items():
            shards = None
            if ps.sharding_spec is not None:
                shards = [
                    {
                        "offsets": list(s.shard_offsets),
                        "sizes": list(s.shard_sizes),
                        "placement": str(s.placement),
                    }
                    for s in ps.sharding_spec.shards
                ]
            tables[name] = {
                "sharding_type": ps.sharding_type,
                "compute_kernel": ps.compute_kernel,
                "ranks": list(ps.ranks) if ps.ranks is not None else None,
                "shards": shards,
            }
        out[path] = tables
    return out


def sharding_plan_from_dict(doc: dict, source: str = "plan") -> ShardingPlan:
    """The inverse of :func:`sharding_plan_to_dict` (``ValueError`` naming the bad entry)."""
    plan = {}
    for path, tables in doc.items():
        module_plan = EmbeddingModuleShardingPlan()
        for name, t in tables.items():
            try:
                spec = None
                if t.get("shards") is not None:
                    spec = EnumerableShardingSpec(
                        [
                            ShardMetadata(list(s["offsets"]), list(s["sizes"]), s["placement"])
                            for s in t["shards"]
                        ]
                    )
                module_plan[name] = ParameterSharding(
                    sharding_type=t["sharding_type"],
                    compute_kernel=t["compute_kernel"],
                    ranks=t.get("ranks"),
                    sharding_spec=spec,
                )
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{source}: sharding of {path!r}/{name!r} is malformed ({e})") from None
        plan[path] = module_plan
    return ShardingPlan(plan)
