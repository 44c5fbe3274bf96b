"""Under DistributedDataParallel: synchronised gradients, statistics over every rank's samples,
one writer."""

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


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = models.small_mlp(width=16)
    with torch.no_grad():
        # Units 0-7 of the first hidden layer fire only for inputs with a large first feature,
        # which only rank 1's half of the batch has: dead on rank 0 alone, alive overall.
        model[0].weight[:8].zero_()
        model[0].weight[:8, 0] = 1.0
        model[0].bias[:8] = -5.0
    return model


def data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    x[:, 0] = 0.0
    x[32:, 0] = 10.0  # rank 1's samples
    return x, y


def summary(watch: GradWatch) -> dict:
    rep = watch.report()
    # A DDP-wrapped model's layers are named as in the bare model (no "module." prefix).
    return {"params": {k: p.grad_norm for k, p in rep.params.items()},
            "layers": {k: (l.count, l.mean, l.std, l.zero_fraction, l.dead_fraction, l.output_grad_norm)
                       for k, l in rep.layers.items()},
            "findings": [(f.kind.value, f.layer) for f in rep.findings]}


def watch_two_steps(model: nn.Module, rank: int, **kwargs) -> dict:
    """Two backward passes on this rank's half of the batch, watched at every step."""
    x, y = data()
    x, y = x[rank * 32:(rank + 1) * 32], y[rank * 32:(rank + 1) * 32]
    with GradWatch(model, every=1, dead_window=2, quiet=True, strict=True, **kwargs) as watch:
        for _ in range(2):
            nn.functional.cross_entropy(model(x), y).backward()
    return summary(watch)


def single() -> dict:
    model = make_model()
    x, y = data()
    with GradWatch(model, every=1, dead_window=2, quiet=True, strict=True) as watch:
        for _ in range(2):
            nn.functional.cross_entropy(model(x), y).backward()
    return summary(watch)


def worker(rank: int, world: int, port: int, root: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(make_model())
        out[rank] = watch_two_steps(model, rank, log_dir=os.path.join(root, f"rank{rank}"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_report_what_one_process_sees_on_the_whole_batch(tmp_path):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(2, free_port(), str(tmp_path), out), nprocs=2, join=True)
        ranks = dict(out)
    one = single()
    assert one["layers"]["1"][4] == 0.0  # the planted units are alive on the whole batch
    for rank in (0, 1):
        got = ranks[rank]
        assert got["params"].keys() == one["params"].keys()
        for name, value in one["params"].items():
            assert got["params"][name] == pytest.approx(value, rel=1e-4), (rank, name)
        for name, (count, mean, std, zeros, dead, og) in one["layers"].items():
            g = got["layers"][name]
            assert g[0] == count
            assert g[1] == pytest.approx(mean, rel=1e-4, abs=1e-6) and g[2] == pytest.approx(std, rel=1e-4)
            assert g[3] == pytest.approx(zeros, abs=1e-9) and g[4] == dead, (rank, name)
            assert g[5] == pytest.approx(og, rel=1e-4), (rank, name)
        assert got["findings"] == one["findings"]
    assert (tmp_path / "rank0").is_dir() and not (tmp_path / "rank1").exists()  # rank 1 writes nothing


def fsdp_worker(rank: int, world: int, port: int, out: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        model = make_model()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        out[rank] = watch_two_steps(model, rank)
    finally:
        dist.destroy_process_group()


class FunctionalMLP(nn.Module):
    """The planted MLP with its ReLU called as a function (measured with functional=True)."""

    def __init__(self) -> None:
        super().__init__()
        mlp = make_model()
        self.fc1, self.fc2 = mlp[0], mlp[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.relu(self.fc1(x)))


def functional_worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out[rank] = watch_two_steps(nn.parallel.DistributedDataParallel(FunctionalMLP()), rank, functional=True)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_functional_layers_are_combined_across_ranks():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(functional_worker, args=(2, free_port(), out), nprocs=2, join=True)
        ranks = dict(out)
    x, y = data()
    model = FunctionalMLP()
    with GradWatch(model, every=1, dead_window=2, quiet=True, strict=True, functional=True) as watch:
        for _ in range(2):
            nn.functional.cross_entropy(model(x), y).backward()
    one = summary(watch)["layers"]["(model):relu"]
    for rank in (0, 1):
        got = ranks[rank]["layers"]["(model):relu"]
        assert got[0] == one[0] and got[1] == pytest.approx(one[1], rel=1e-4)  # count, mean over both halves
        assert got[4] == one[4] == 0.0  # units dead on rank 0 alone are alive overall


@pytest.mark.slow
def test_fsdp_norms_come_from_every_shard():
    pytest.importorskip("torch.distributed.fsdp", reason="no FSDP in this torch")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("torch.distributed.fsdp.fully_shard is not in this torch")
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(fsdp_worker, args=(2, free_port(), out), nprocs=2, join=True)
        ranks = dict(out)
    one = single()
    for rank in (0, 1):
        got = ranks[rank]
        for name, value in one["params"].items():
            assert got["params"][name] == pytest.approx(value, rel=1e-4), (rank, name)
        assert got["layers"]["1"][4] == one["layers"]["1"][4]  # dead units over both ranks' samples


@pytest.mark.slow
def test_the_torchrun_example_runs_with_two_processes(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "examples/ddp_watch.py", "--steps", "120", "--runs", str(tmp_path / "ddp")],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = sorted(line for line in done.stdout.splitlines() if line.startswith("rank "))
    assert len(lines) == 2 and "dead_units" in lines[0]
    assert lines[0].split(":", 1)[1] == lines[1].split(":", 1)[1]  # the same findings on both ranks
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir())[0].startswith("events.out.tfevents")


def auto_worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(make_model())
        x, y = data()
        x, y = x[rank * 32:(rank + 1) * 32], y[rank * 32:(rank + 1) * 32]
        with GradWatch(model, quiet=True) as watch:
            # Timing-free stand-ins for the budget: only rank 1 asks for a wider interval, at step 100.
            watch.schedule.adapt = lambda step, own=0.0: 80 if rank == 1 and step == 100 else None
            for _ in range(200):
                nn.functional.cross_entropy(model(x), y).backward()
        out[rank] = (watch.every, watch.report().step)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_agree_on_an_adaptive_interval():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(auto_worker, args=(2, free_port(), out), nprocs=2, join=True)
        ranks = dict(out)
    assert ranks[0] == ranks[1] == (80, 160)  # rank 0 adopts rank 1's interval: same measured steps, no hang
