"""Under DistributedDataParallel, gradient statistics describe the synchronised gradients."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gradwatch import GradWatch
from tests import models

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)


def norms_single() -> dict:
    torch.manual_seed(0)
    model = models.small_mlp()
    x, y = data()
    with GradWatch(model, every=1, quiet=True, strict=True) as watch:
        nn.functional.cross_entropy(model(x), y).backward()
    return {k: p.grad_norm for k, p in watch.report().params.items()}


def worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(models.small_mlp())
        x, y = data()
        x, y = x[rank * 32:(rank + 1) * 32], y[rank * 32:(rank + 1) * 32]
        with GradWatch(model, every=1, quiet=True, strict=True) as watch:
            nn.functional.cross_entropy(model(x), y).backward()
        out[rank] = {k.removeprefix("module."): p.grad_norm for k, p in watch.report().params.items()}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gradient_norms_match_a_single_process_with_the_whole_batch():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(2, free_port(), out), nprocs=2, join=True)
        ranks = dict(out)
    single = norms_single()
    for rank in (0, 1):
        assert ranks[rank].keys() == single.keys()
        for name, value in single.items():
            assert ranks[rank][name] == pytest.approx(value, rel=1e-4), (rank, name)
