"""What the gradient-flow image in TensorBoard costs: its drawing time, and its share of a run.

    python benchmarks/tensorboard_image.py [--steps 3000] [--depth 5]

Trains an MLP (the Fashion-MNIST seed MLP's widths, or ``--depth`` layers of 256) on random
data, watched with the defaults and a ``log_dir``, and times every drawing of the image (on
histogram steps, every 200 steps, within ``IMAGE_BUDGET`` of the training time). Prints the
drawings, their median time, and their total as a share of the run's time. ``--every-histogram``
draws on every histogram step instead, to show what the budget saves.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from gradwatch import GradWatch
from gradwatch.sinks import flow_image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--depth", type=int, default=0, help="layers of width 256 (default: the seed MLP)")
    p.add_argument("--every-histogram", action="store_true", help="no time budget: an image per histogram step")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    dims = [784, 512, 256, 256, 128, 10] if not args.depth else [784] + [256] * args.depth + [10]
    layers: list = []
    for a, b in zip(dims, dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
    if args.every_histogram:
        flow_image.IMAGE_BUDGET = None
    draws = []
    real = flow_image.FlowImage.png

    def timed(self):
        start = time.perf_counter()
        png = real(self)
        draws.append(time.perf_counter() - start)
        return png

    flow_image.FlowImage.png = timed  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        with GradWatch(model, log_dir=tmp, quiet=True):
            for _ in range(args.steps):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        total = time.perf_counter() - start
    histogram_steps = len(range(0, args.steps, 200))
    print(f"{len(dims) - 1} linear layers, {args.steps} steps in {total:.1f} s ({total / args.steps * 1e3:.1f} ms a "
          f"step); {histogram_steps} histogram steps, {len(draws)} images")
    if draws:
        print(f"drawing: median {statistics.median(draws) * 1e3:.0f} ms (first, with matplotlib's import: "
              f"{draws[0] * 1e3:.0f} ms); after the first, {sum(draws[1:]):.2f} s = "
              f"{sum(draws[1:]) / total:.2%} of the run")


if __name__ == "__main__":
    main()
