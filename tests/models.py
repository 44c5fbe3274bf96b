"""Small real models shared by the tests (one place, so every test speaks the same language)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

SEED_DIMS = (784, 512, 256, 256, 128, 10)
"""The Fashion-MNIST seed MLP of the gradient-flow experiment."""


class Sigmoid(nn.Module):
    """A user-written activation, as in the gradient-flow experiment: unknown to gradwatch by type."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1 / (1 + torch.exp(-x))


class Tanh(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)


class Relu(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=0)


class LeakyRelu(nn.Module):
    def __init__(self, alpha: float = 0.1) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x, self.alpha * x)


class Elu(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x, torch.exp(x) - 1)


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


def mlp(act: Callable[[], nn.Module], dims: Sequence[int] = SEED_DIMS) -> nn.Sequential:
    layers: list = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def small_mlp(act: Callable[[], nn.Module] = nn.ReLU, width: int = 16) -> nn.Sequential:
    return mlp(act, (8, width, width, 3))


def small_cnn() -> nn.Sequential:
    """The MNIST CNN's shape, shrunk: conv-pool-conv-pool-fc-dropout-fc."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 3 * 3, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))


class TupleOut(nn.Module):
    """Returns a tuple and a dict with a non-tensor inside: only tensors are measured."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor):
        h = self.lin(x)
        return h, {"aux": h * 2, "note": "not a tensor", "ids": torch.arange(3)}


class WithTuple(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = TupleOut()
        self.act = nn.Tanh()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, extra = self.block(x)
        return self.head(self.act(h + extra["aux"]))


class Shared(nn.Module):
    """One Linear used three times per forward (shared weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            x = self.act(self.lin(x))
        return self.head(x)


class NanAt(nn.Module):
    """Identity that turns the first element into NaN when armed (planted pathology)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.armed:
            return x
        y = x.clone()
        y.view(-1)[0] = float("nan")
        return y


def batch(n: int = 32, features: int = 8, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)


def train(model: nn.Module, steps: int = 3, x=None, y=None, lr: float = 0.05) -> list:
    """A plain SGD loop; returns the losses."""
    if x is None:
        x, y = batch()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
