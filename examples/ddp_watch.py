"""gradwatch under DistributedDataParallel: run it with torchrun.

    torchrun --nproc_per_node 2 examples/ddp_watch.py            # one machine, 2 processes (CPU: gloo)
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --nproc_per_node 4 examples/ddp_watch.py   # on each node

Every rank wraps its replica in DDP and in ``GradWatch``. gradwatch reads the
synchronised gradients (after DDP's all-reduce), combines activation statistics across
ranks with one all-reduce per logging step (a unit is dead only if it is dead on every
rank's samples), and only rank 0 prints and writes TensorBoard (``runs/ddp``). Every rank
ends with the same report. One ReLU layer starts with a large negative bias, so there is
something to find.
"""

from __future__ import annotations

if not __package__:  # run as a file (python examples/ddp_watch.py): import from the checkout, not examples/
    import os
    import sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import os
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gradwatch import GradWatch


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--runs", default="runs/ddp")
    args = p.parse_args(argv)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    try:
        torch.manual_seed(0)  # same initial weights on every rank
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
        with torch.no_grad():
            model[2].bias.fill_(-20.0)
        model = nn.parallel.DistributedDataParallel(model.to(device))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
        with GradWatch(model, log_dir=args.runs, every=10, optimizer=opt) as watch:
            for _ in range(args.steps):
                x = torch.randn(64, 64, generator=g).to(device)
                y = (x[:, :10].argmax(1)).to(device)
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        kinds = sorted({(f.kind.value, f.layer) for f in watch.findings})
        print(f"rank {rank}/{world}: {len(watch.findings)} finding(s): {kinds}", flush=True)
        # Every rank done before any tears its connections down, and DDP's reducer (which holds
        # the process group) gone first: otherwise gloo aborts now and then at exit
        # ("terminate called without an active exception", about 1 run in 10 here).
        del model, opt
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
