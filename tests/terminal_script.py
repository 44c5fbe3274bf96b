"""Every finding kind, planted and trained the way a user runs a script: no warning capture,
warnings drawn as panels in a real terminal. Run by tests/test_terminal_findings.py in a pty:

    python tests/terminal_script.py MODE OUT_DIR COLUMNS [COLUMNS ...]

For each terminal width (the terminal is resized, and COLUMNS set, before each run) and each
kind, trains the kind's planted model for a few steps under ``GradWatch(model, log_dir=OUT_DIR/
<kind>-<columns>, steps=MODE, optimizer=opt)`` and prints ``trained <kind> <columns>`` once the
loop is done. Layer names hold rich markup (``[/]``, ``[bold]``): they must print as they are.
"""

from __future__ import annotations

import fcntl
import math
import os
import struct
import sys
import termios
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from gradwatch import GradWatch

STEPS = 4


def seq(*pairs: Tuple[str, nn.Module]) -> nn.Sequential:
    return nn.Sequential(OrderedDict(pairs))


def mlp(dims, act, names: Dict[int, str] = {}) -> nn.Sequential:  # noqa: B006 -- read only
    pairs = []
    for i in range(len(dims) - 1):
        pairs.append((names.get(2 * i, f"fc{i + 1}"), nn.Linear(dims[i], dims[i + 1])))
        if i < len(dims) - 2:
            pairs.append((names.get(2 * i + 1, f"act{i + 1}"), act()))
    return seq(*pairs)


class Log(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x)[0].mean(1))


Planted = Tuple[nn.Module, Callable[[int], Tuple[torch.Tensor, torch.Tensor]],
                Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor], float, str]


def planted(kind: str) -> Planted:
    """The model, its batches, its loss, its SGD learning rate, and the layer name to look for."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 32, generator=g), torch.randint(3, (64,), generator=g)
    batch = lambda i: (x, y)  # noqa: E731
    ce = lambda out, t, i: F.cross_entropy(out, t)  # noqa: E731
    if kind == "vanishing":
        return mlp([32] + [64] * 8 + [3], nn.Sigmoid, {0: "in[/]"}), batch, ce, 0.1, "in[/]"
    if kind == "exploding":  # a loss scaled 1e5 for three steps: a huge gradient that then clears
        model = mlp([32, 64, 64, 3], nn.ReLU, {0: "in[/]"})
        return model, batch, lambda out, t, i: F.cross_entropy(out, t) * (1e5 if i < 3 else 1.0), 1e-9, "in[/]"
    if kind == "dead_units":
        model = mlp([32, 64, 64, 3], nn.ReLU, {3: "act[/]2"})
        with torch.no_grad():
            model[2].bias.fill_(-100.0)
        return model, batch, ce, 0.01, "act[/]2"
    if kind == "saturation":
        return (mlp([32, 64, 64, 3], nn.Tanh, {1: "tanh[bold]1"}), lambda i: (50 * x, y), ce, 0.01,
                "tanh[bold]1")
    if kind == "non_finite":
        return seq(("fc[/]1", nn.Linear(32, 64)), ("log[red]", Log()), ("fc2", nn.Linear(64, 3))), batch, ce, \
            0.01, "log[red]"
    if kind == "learning_rate":  # SGD at lr 10 (the learning-rate finding needs optimizer=, given in every mode)
        return mlp([32, 128, 128, 3], nn.Sigmoid), batch, ce, 10.0, ""
    if kind == "attention_collapse":  # query and key projections scaled x16: one-hot attention
        model = Attention()
        with torch.no_grad():
            model.attn.in_proj_weight[:64] *= 16
        xs = torch.randn(16, 12, 32, generator=g)
        return model, lambda i: (xs, y[:16]), ce, 0.01, "attn"
    raise ValueError(kind)


KINDS = ("vanishing", "exploding", "dead_units", "saturation", "non_finite", "learning_rate", "attention_collapse")


def resize(columns: int) -> None:
    """A terminal of this width, as a user's would be: the tty's size, and COLUMNS."""
    os.environ["COLUMNS"] = str(columns)
    fcntl.ioctl(sys.stderr.fileno(), termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))


def train(kind: str, mode: str, out: Path, columns: int) -> None:
    torch.manual_seed(0)
    model, batch, loss_fn, lr, _ = planted(kind)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with GradWatch(model, log_dir=out / f"{kind}-{columns}", steps=mode, optimizer=opt, every=1,
                   dead_window=2) as watch:
        for i in range(STEPS):
            xb, yb = batch(i)
            loss = loss_fn(model(xb), yb, i)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if mode == "manual":
                watch.step()
    assert math.isfinite(watch.steps)
    print(f"trained {kind} {columns}", flush=True)


def main() -> None:
    mode, out, widths = sys.argv[1], Path(sys.argv[2]), [int(c) for c in sys.argv[3:]]
    torch.set_num_threads(1)
    for columns in widths:
        resize(columns)
        for kind in KINDS:
            train(kind, mode, out, columns)
    print("all trained", flush=True)


if __name__ == "__main__":
    main()
