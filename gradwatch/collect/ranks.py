"""Combining across processes (DDP, FSDP): step totals from a declared table, and sharded gradients.

Under ``torch.distributed`` with several processes, every rank measures its own samples;
the per-site totals of a measured step travel in one all-reduce of one flat float64 tensor,
laid out from :data:`~gradwatch.collect.summary.REDUCTIONS` (sums in one tensor, maxima in
another), so every field of :class:`~gradwatch.collect.summary.SiteTotals` is combined by
the rule it declares. Ranks first check, with one tiny all-reduce, that they hold the same
call sites; when they do not, the names are exchanged once. Parameter gradients need no
combining under DDP (they are all-reduced already); FSDP's shards are combined here.
"""

from __future__ import annotations

import zlib
from typing import Any, Dict, List, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .noise import FIELDS as NOISE_FIELDS
from .summary import REDUCTIONS, SiteTotals, StepTotals


def world() -> int:
    """World size under torch.distributed with more than one process, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def comm_device() -> torch.device:
    # NCCL moves only CUDA tensors; gloo only CPU ones.
    backend = str(dist.get_backend())
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_max(value: int) -> int:
    """The largest ``value`` any rank proposes (every rank must call this together)."""
    if world() == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _same_everywhere(names: List[str]) -> bool:
    h = float(zlib.crc32("\n".join(names).encode()))
    t = torch.tensor([h, -h], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t[0].item() == -t[1].item()


def site_names(local: List[str]) -> List[str]:
    """The call sites of every rank, in one order all ranks share."""
    if _same_everywhere(local):
        return local
    gathered: List[Any] = [None] * world()
    dist.all_gather_object(gathered, local)
    names: Dict[str, None] = {}
    for part in gathered:
        names.update(dict.fromkeys(part))
    return list(names)


class RankCombiner:
    """Combines a measured step's totals over all ranks (per-unit dead flags included)."""

    def __init__(self) -> None:
        self._units: Dict[str, int] = {}  # per site, the unit count agreed across ranks

    def combine(self, tot: StepTotals) -> StepTotals:
        names = site_names(list(tot.sites))
        self._agree_units([s for s in names if s not in self._units], tot)
        sums = [name for name, how in REDUCTIONS if how == "sum"]
        maxes = [name for name, how in REDUCTIONS if how == "max"]
        assert len(sums) + len(maxes) == len(REDUCTIONS), "a SiteTotals field without a known reduction"
        vec_sum: List[float] = []
        vec_max: List[float] = []
        for s in names:
            t = tot.sites.get(s) or SiteTotals(present=0.0)
            vec_sum += [getattr(t, f) for f in sums]
            vec_max += [getattr(t, f) for f in maxes]
        for s in names:
            size = self._units[s]
            mine = [float(v) for v in tot.dead.get(s, [])][:size]
            vec_sum += mine + [0.0] * (size - len(mine))
        vec_sum += tot.noise if tot.noise is not None else [0.0] * NOISE_FIELDS  # the noise scale's, at the end
        summed = self._all_reduce(vec_sum, dist.ReduceOp.SUM)
        maxed = self._all_reduce(vec_max, dist.ReduceOp.MAX)
        sites: Dict[str, SiteTotals] = {}
        dead: Dict[str, List[float]] = {}
        pos = 0
        for i, s in enumerate(names):
            values = dict(zip(sums, summed[pos:pos + len(sums)]))
            values.update(zip(maxes, maxed[i * len(maxes):(i + 1) * len(maxes)]))
            pos += len(sums)
            sites[s] = SiteTotals(**values)
        for s in names:
            size = self._units[s]
            if size and s in tot.dead_window:
                dead[s] = summed[pos:pos + size]
            pos += size
        tot.sites, tot.dead, tot.noise = sites, dead, summed[-NOISE_FIELDS:]
        tot.backward_order = [s for s in tot.backward_order if s in sites]
        return tot

    def _agree_units(self, new: List[str], tot: StepTotals) -> None:
        if not new:
            return
        sizes = self._all_reduce([float(len(tot.dead.get(s, []))) for s in new], dist.ReduceOp.MAX)
        self._units.update({s: int(v) for s, v in zip(new, sizes)})

    @staticmethod
    def _all_reduce(values: List[float], op: Any) -> List[float]:
        if not values:
            return []
        t = torch.tensor(values, dtype=torch.float64, device=comm_device())
        dist.all_reduce(t, op=op)
        return t.tolist()


def local_shard(t: Tensor) -> Tuple[Tensor, Any]:
    """This rank's part of a sharded DTensor (FSDP) and the group to reduce over, or ``(t, None)``."""
    if type(t).__name__ != "DTensor":
        return t, None
    sharded = any(p.is_shard() for p in t.placements)
    return t.to_local(), (t.device_mesh.get_group() if sharded else None)


def reduce_shards(summary: Tensor, groups: List[Any], max_rows: Tuple[int, ...]) -> Tensor:
    """Per-parameter rows computed on shards -> the whole parameters': L2 norms combine as the
    root of summed squares, maxima as the maximum -- at most two collectives, on measured steps."""
    sharded = [i for i, g in enumerate(groups) if g is not None]
    if not sharded:
        return summary
    group = groups[sharded[0]]
    out = summary.clone()
    idx = torch.tensor(sharded, device=summary.device)
    for row in range(summary.shape[0]):
        part = summary[row, idx]
        if row in max_rows:
            dist.all_reduce(part, op=dist.ReduceOp.MAX, group=group)
        else:
            part = part.square()
            dist.all_reduce(part, group=group)
            part = part.sqrt()
        out[row, idx] = part
    return out

