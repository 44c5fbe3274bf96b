"""Accuracy of gradwatch's findings: healthy training must stay silent, planted pathologies must be named.

Each case trains a small model for a few hundred steps on synthetic data (CPU, fixed seeds)
under ``GradWatch(model, every=5, quiet=True)`` and records every finding. A *healthy* case
expects none; a *planted* case expects findings of given kinds on layers matching given
name patterns (``fnmatch`` globs, so ``"block.relu*"`` also matches a call-site suffix such
as ``block.relu#2``).

    python benchmarks/accuracy.py                    # the whole suite (~5 min on 2 CPU cores);
                                                     # writes docs/accuracy.md
    python benchmarks/accuracy.py --list             # the cases, one a line
    python benchmarks/accuracy.py --only lstm-classifier dead-relu-mlp
    python benchmarks/accuracy.py --quick            # a third of the steps: a smoke run

Scoring, per finding kind K, over (case, K) pairs: an expected (K, pattern) of a planted case
is a true positive when a finding of kind K names a layer matching the pattern, else a false
negative; a case has one false positive for K when it raised a finding of kind K that no
expectation of that case covers (on a healthy case, any finding). Precision = TP / (TP + FP),
recall = TP / (TP + FN).

Exit status: 1 when a healthy case warned (or a case failed to run), else 0; planted cases
that are missed are reported but do not change the status. gradwatch's notices that are not
findings (plain ``GradWatchWarning``, e.g. "nothing could be measured") are listed, not counted.

Adding a case: append a ``Case`` to ``CASES`` (a builder returning a ``Setup``: the model and a
function doing one training step). A planted case may name a finding kind this gradwatch does
not have yet (as a string, e.g. ``"learning_rate"``): it is listed and skipped until the kind
exists. ``ahead=((a, b),)``: kind a's first finding must come at an earlier step than b's (a warning
that must come before the NaN), else the case is "named too late".
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import os
import platform
import random
import sys
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize

from gradwatch import FindingKind, GradWatch, GradWatchWarning

KindName = Union[FindingKind, str]
Expect = Tuple[KindName, str]

DEFAULT_STEPS = 300
DEFAULT_EVERY = 5
DOC = Path(__file__).resolve().parent.parent / "docs" / "accuracy.md"


# ====================================================================== the case type
@dataclass
class Setup:
    """What a case's builder returns: the model to watch and one training step.

    ``step(i)`` runs training step ``i`` (forward, backward, optimizer step) and returns the
    loss as a float. ``watch`` holds extra ``GradWatch`` keyword arguments a user of this
    setup would pass (``functional=True``, ``optimizer=opt``).
    """

    model: nn.Module
    step: Callable[[int], float]
    watch: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    """One training setup: healthy when ``expect`` is empty, else the findings it must raise."""

    name: str
    family: str
    about: str
    build: Callable[[], Setup]
    expect: Tuple[Expect, ...] = ()
    steps: int = DEFAULT_STEPS
    every: int = DEFAULT_EVERY
    ahead: Tuple[Tuple[KindName, KindName], ...] = ()  # (a, b): a's first finding at an earlier step than b's

    @property
    def healthy(self) -> bool:
        return not self.expect

    def missing_kinds(self) -> List[str]:
        """Expected kinds this gradwatch does not know (the case is skipped until they exist)."""
        known = {k.value for k in FindingKind}
        return [k for k, _ in self.expect if isinstance(k, str) and k not in known]

    def expectations(self) -> List[Tuple[FindingKind, str]]:
        return [(k if isinstance(k, FindingKind) else FindingKind(k), p) for k, p in self.expect]


# ====================================================================== synthetic data
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Batches:
    """A fixed synthetic data set served as mini-batches in order, round and round."""

    def __init__(self, *tensors: Tensor, batch: int) -> None:
        n = tensors[0].shape[0]
        assert n % batch == 0 and all(t.shape[0] == n for t in tensors)
        self.tensors, self.batch, self.n = tensors, batch, n

    def __call__(self, i: int) -> Tuple[Tensor, ...]:
        start = (i * self.batch) % self.n
        return tuple(t[start:start + self.batch] for t in self.tensors)


def images(n: int = 1024, classes: int = 10, channels: int = 1, size: int = 16, noise: float = 0.6,
           seed: int = 1) -> Tuple[Tensor, Tensor]:
    """Smooth random class templates plus noise: a small, learnable image classification task."""
    g = _gen(seed)
    coarse = torch.randn(classes, channels, size // 4, size // 4, generator=g)
    templates = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.randint(classes, (n,), generator=g)
    x = templates[y] + noise * torch.randn(n, channels, size, size, generator=g)
    return x, y


def teacher(n: int = 2048, dim: int = 32, classes: int = 10, seed: int = 2) -> Tuple[Tensor, Tensor]:
    """Gaussian inputs labelled by a random two-layer tanh network."""
    g = _gen(seed)
    x = torch.randn(n, dim, generator=g)
    w1 = torch.randn(dim, 64, generator=g) / math.sqrt(dim)
    w2 = torch.randn(64, classes, generator=g) / 8
    return x, (torch.tanh(x @ w1) @ w2).argmax(1)


def regression(n: int = 2048, dim: int = 32, out: int = 4, seed: int = 3) -> Tuple[Tensor, Tensor]:
    g = _gen(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, out, generator=g) / math.sqrt(dim)
    return x, torch.sin(2 * x @ w)


def sequences(n: int = 1024, length: int = 20, features: int = 8, seed: int = 4) -> Tuple[Tensor, Tensor]:
    """Is the sum of the first feature over time positive? Needs the whole sequence."""
    x = torch.randn(n, length, features, generator=_gen(seed))
    return x, (x[:, :, 0].sum(1) > 0).long()


def tokens(n: int = 1024, length: int = 16, vocab: int = 16, seed: int = 5) -> Tuple[Tensor, Tensor]:
    """Token sequences; label: does token 3 occur more often than token 5?"""
    x = torch.randint(vocab, (n, length), generator=_gen(seed))
    return x, ((x == 3).sum(1) > (x == 5).sum(1)).long()


def bitmaps(n: int = 1024, side: int = 8, seed: int = 6) -> Tensor:
    """Binary 8x8 pictures: a random axis-aligned rectangle each, for autoencoders."""
    g = _gen(seed)
    out = torch.zeros(n, side * side)
    corners = torch.randint(side - 2, (n, 2), generator=g)
    sizes = torch.randint(2, side // 2 + 1, (n, 2), generator=g)
    for i in range(n):
        r, c = corners[i].tolist()
        h, w = sizes[i].tolist()
        pic = torch.zeros(side, side)
        pic[r:r + h, c:c + w] = 1
        out[i] = pic.flatten()
    return out


def graph(nodes: int = 256, features: int = 16, classes: int = 4, degree: int = 6,
          seed: int = 7) -> Tuple[Tensor, Tensor, Tensor]:
    """A random graph (edge list, both directions), node features, and labels that are
    smooth over the graph (a random teacher applied to neighbourhood means)."""
    g = _gen(seed)
    src = torch.arange(nodes).repeat_interleave(degree)
    dst = torch.randint(nodes, (nodes * degree,), generator=g)
    edges = torch.stack([torch.cat([src, dst]), torch.cat([dst, src])])
    x = torch.randn(nodes, features, generator=g)
    agg = torch.zeros_like(x).index_add_(0, edges[1], x[edges[0]])
    agg = agg / torch.bincount(edges[1], minlength=nodes).clamp(min=1)[:, None]
    w = torch.randn(features, classes, generator=g)
    return x, edges, (agg @ w).argmax(1)


# ====================================================================== building blocks
def seq(*pairs: Tuple[str, nn.Module]) -> nn.Sequential:
    """An ``nn.Sequential`` whose layers have readable names."""
    return nn.Sequential(OrderedDict(pairs))


def mlp(dims: Sequence[int], act: Callable[[], nn.Module]) -> nn.Sequential:
    """fc1, act1, fc2, act2, ..., fcN (no activation after the last layer)."""
    pairs: List[Tuple[str, nn.Module]] = []
    for i in range(len(dims) - 1):
        pairs.append((f"fc{i + 1}", nn.Linear(dims[i], dims[i + 1])))
        if i < len(dims) - 2:
            pairs.append((f"act{i + 1}", act()))
    return seq(*pairs)


def supervised(model: nn.Module, data: Batches, opt: torch.optim.Optimizer,
               loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
               clip: Optional[float] = None) -> Setup:
    """The plain loop: forward, loss, zero_grad, backward, (clip), step."""

    def step(i: int) -> float:
        x, y = data(i)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        return loss.item()
    return Setup(model, step)


class SmallCNN(nn.Module):
    """conv-act-pool, conv-act-pool, fc-act, fc, on 16x16 images; the activation is a choice."""

    def __init__(self, act: Callable[[], nn.Module] = nn.ReLU, channels: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 16, 3, padding=1)
        self.act1 = act()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.act2 = act()
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.act3 = act()
        self.fc2 = nn.Linear(64, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.act1(self.conv1(x)))
        x = self.pool2(self.act2(self.conv2(x)))
        return self.fc2(self.act3(self.fc1(x.flatten(1))))


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: one ``self.relu`` module called at two places."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class TinyResNet(nn.Module):
    def __init__(self, channels: int = 16, blocks: int = 2, classes: int = 10, zero_init_residual: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(*[BasicBlock(channels) for _ in range(blocks)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:  # as torchvision's resnet(zero_init_residual=True)
            for b in self.layer1:
                nn.init.zeros_(b.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def resnet_setup(zero_init_residual: bool = False, relu_bias: Optional[float] = None) -> Setup:
    model = TinyResNet(zero_init_residual=zero_init_residual)
    if relu_bias is not None:  # planted: the first ReLU call site of the first block switched off
        nn.init.constant_(model.layer1[0].bn1.bias, relu_bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return supervised(model, Batches(*images(channels=3, seed=11), batch=32), opt)


# ====================================================================== healthy setups
def h_conv_relu() -> Setup:
    model = SmallCNN(nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    return supervised(model, Batches(*images(), batch=32), opt)


def h_lstm() -> Setup:
    class LSTMClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(8, 32, batch_first=True)
            self.head = nn.Linear(32, 2)

        def forward(self, x: Tensor) -> Tensor:
            out, _ = self.lstm(x)
            return self.head(out[:, -1])

    model = LSTMClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return supervised(model, Batches(*sequences(), batch=32), opt, clip=1.0)


def h_gru() -> Setup:
    """Sequence to sequence: predict the running mean of the first feature at each step."""
    class GRURegressor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru = nn.GRU(8, 32, num_layers=2, batch_first=True)
            self.head = nn.Linear(32, 1)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.gru(x)[0]).squeeze(-1)

    x, _ = sequences(seed=12)
    target = x[:, :, 0].cumsum(1) / torch.arange(1, x.shape[1] + 1)
    model = GRURegressor()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    return supervised(model, Batches(x, target, batch=32), opt, loss_fn=F.mse_loss)


class TokenTransformer(nn.Module):
    def __init__(self, vocab: int = 16, d: int = 32, heads: int = 4, layers: int = 2, length: int = 16,
                 classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(x) + self.pos).mean(1))


def h_transformer() -> Setup:
    model = TokenTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return supervised(model, Batches(*tokens(), batch=32), opt)


def h_batchnorm_mlp() -> Setup:
    model = seq(("fc1", nn.Linear(32, 128)), ("bn1", nn.BatchNorm1d(128)), ("act1", nn.ReLU()),
                ("fc2", nn.Linear(128, 128)), ("bn2", nn.BatchNorm1d(128)), ("act2", nn.ReLU()),
                ("fc3", nn.Linear(128, 10)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return supervised(model, Batches(*teacher(), batch=64), opt)


class UserLayerNorm(nn.Module):
    """LayerNorm written by hand, as in many model repositories (ConvNeXt, nanoGPT)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, unbiased=False)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class RMSNorm(nn.Module):
    """Parameter-free RMS normalisation written by hand (as in some T5/LLaMA re-implementations)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class PreNormBlock(nn.Module):
    """x + MLP(norm(x)), the transformer feed-forward sub-block."""

    def __init__(self, dim: int, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


def h_user_layernorm() -> Setup:
    model = nn.Sequential(OrderedDict([
        ("embed", nn.Linear(32, 64)),
        ("block1", PreNormBlock(64, UserLayerNorm(64))),
        ("block2", PreNormBlock(64, RMSNorm())),
        ("norm", UserLayerNorm(64)),
        ("head", nn.Linear(64, 10))]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    return supervised(model, Batches(*teacher(seed=13), batch=64), opt)


class L2Normalize(nn.Module):
    """Project embeddings onto the unit sphere (metric learning, contrastive heads)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1)


class CosineClassifier(nn.Module):
    """NormFace-style head: scaled cosine similarity between embedding and class weights."""

    def __init__(self, dim: int, classes: int, scale: float = 10.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, dim) * 0.1)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x @ F.normalize(self.weight, dim=-1).t()


def h_normalised_embeddings() -> Setup:
    model = seq(("fc1", nn.Linear(32, 128)), ("act1", nn.ReLU()), ("fc2", nn.Linear(128, 32)),
                ("normalize", L2Normalize()), ("head", CosineClassifier(32, 10)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return supervised(model, Batches(*teacher(seed=14), batch=64), opt)


def h_autoencoder_sigmoid() -> Setup:
    model = seq(("enc1", nn.Linear(64, 32)), ("enc_act", nn.ReLU()), ("code", nn.Linear(32, 8)),
                ("dec1", nn.Linear(8, 32)), ("dec_act", nn.ReLU()), ("dec2", nn.Linear(32, 64)),
                ("out", nn.Sigmoid()))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = bitmaps()
    return supervised(model, Batches(x, x, batch=64), opt, loss_fn=F.binary_cross_entropy)


def h_autoencoder_softmax() -> Setup:
    """Categorical autoencoder: 8 positions x 10 categories, a softmax head and cross-entropy."""
    class CategoricalAE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = mlp([80, 64, 16], nn.ReLU)
            self.decoder = mlp([16, 64, 80], nn.ReLU)
            self.softmax = nn.Softmax(dim=-1)

        def forward(self, x: Tensor) -> Tensor:
            logits = self.decoder(self.encoder(x.flatten(1))).view(-1, 8, 10)
            return self.softmax(logits)

    cats = torch.randint(10, (1024, 8), generator=_gen(15))
    x = F.one_hot(cats, 10).float()
    model = CategoricalAE()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_fn(probs: Tensor, target: Tensor) -> Tensor:
        return F.nll_loss(torch.log(probs + 1e-8).flatten(0, 1), target.flatten())
    return supervised(model, Batches(x, cats, batch=64), opt, loss_fn=loss_fn)


def amp_setup(model: nn.Module, data: Batches, opt: torch.optim.Optimizer, dtype: torch.dtype,
              pass_optimizer: bool, pass_scaler: bool = False,
              loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> Setup:
    """The documented mixed-precision recipe: autocast forward, GradScaler on the loss."""
    # growth_interval=20 (default 2000): the scale keeps probing upwards, so that these 300 steps hold
    # the overflow -> skipped step -> back-off cycles that a long run has.
    scaler = torch.amp.GradScaler("cpu", growth_interval=20)

    def step(i: int) -> float:
        x, y = data(i)
        with torch.autocast("cpu", dtype=dtype):
            loss = loss_fn(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.item()
    watch: Dict[str, Any] = {"optimizer": opt} if pass_optimizer else {}
    if pass_scaler:
        watch["scaler"] = scaler
    return Setup(model, step, watch)


def h_amp_fp16() -> Setup:
    model = SmallCNN(nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    return amp_setup(model, Batches(*images(seed=16), batch=32), opt, torch.float16, pass_optimizer=False)


def h_amp_bf16() -> Setup:
    model = seq(("fc1", nn.Linear(32, 128)), ("ln1", nn.LayerNorm(128)), ("act1", nn.GELU()),
                ("fc2", nn.Linear(128, 128)), ("ln2", nn.LayerNorm(128)), ("act2", nn.GELU()),
                ("fc3", nn.Linear(128, 10)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return amp_setup(model, Batches(*teacher(seed=17), batch=64), opt, torch.bfloat16, pass_optimizer=True)


class ResidualMLP(nn.Module):
    """A transformer's residual stream without attention: an input projection, pre-norm blocks
    (LayerNorm, Linear, GELU, Linear) added to the stream, a final LayerNorm and a linear head."""

    def __init__(self, dim: int = 32, width: int = 64, hidden: int = 128, blocks: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(seq(("norm", nn.LayerNorm(width)), ("fc1", nn.Linear(width, hidden)),
                                        ("act", nn.GELU()), ("fc2", nn.Linear(hidden, width))) for _ in range(blocks))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h))


def fp16_residual(half: bool, seed: int, grow: Optional[int] = None) -> Setup:
    """The residual MLP in float16: under autocast with AdamW and a GradScaler (passed as ``scaler=``),
    or ``.half()`` with SGD (a GradScaler cannot unscale float16 gradients: none). ``grow``: planted,
    feature 7 of that block's fc2 output, from a bias of 1, is multiplied by 1.1 before every step
    (its weight row and bias): an outlier feature of the residual stream on its way to 65504."""
    model = ResidualMLP()
    data = Batches(*teacher(seed=seed), batch=64)
    fc = model.blocks[grow].fc2 if grow is not None else None
    if fc is not None:
        with torch.no_grad():
            fc.bias[7] = 1.0
    if half:
        model = model.half()
        setup = supervised(model, Batches(data.tensors[0].half(), data.tensors[1], batch=64),
                           torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9),
                           loss_fn=lambda out, y: F.cross_entropy(out.float(), y))
    else:
        setup = amp_setup(model, data, torch.optim.AdamW(model.parameters(), lr=1e-3), torch.float16,
                          pass_optimizer=False, pass_scaler=True)
    if fc is None:
        return setup
    train = setup.step

    def step(i: int) -> float:
        with torch.no_grad():
            fc.weight[7].mul_(1.1)
            fc.bias[7].mul_(1.1)
        return train(i)
    return Setup(model, step, setup.watch)


def h_amp_fp16_nanogpt() -> Setup:
    model = NanoGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    return amp_setup(model, Batches(*shifts(seed=62), batch=32), opt, torch.float16, pass_optimizer=True,
                     loss_fn=_next_token_loss)


def h_finetune_zero_head() -> Setup:
    """Pretrain a backbone (unwatched), then fine-tune it on a new task from a zero-initialised head."""
    backbone = mlp([32, 128, 128, 64], nn.ReLU)
    backbone.add_module("act3", nn.ReLU())
    pre_head = nn.Linear(64, 10)
    pre = nn.Sequential(backbone, pre_head)
    pre_opt = torch.optim.Adam(pre.parameters(), lr=1e-3)
    data = Batches(*teacher(seed=18), batch=64)
    for i in range(100):
        x, y = data(i)
        pre_opt.zero_grad()
        F.cross_entropy(pre(x), y).backward()
        pre_opt.step()
    head = nn.Linear(64, 4)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    model = seq(("backbone", backbone), ("head", head))
    opt = torch.optim.SGD([{"params": backbone.parameters(), "lr": 0.01},
                           {"params": head.parameters(), "lr": 0.1}], momentum=0.9)
    x, _ = teacher(seed=18)
    y = teacher(seed=19, classes=4)[1]  # same inputs, new labels
    return supervised(model, Batches(x, y, batch=64), opt)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update B @ A, B initialised to zero."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scaling = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scaling


def h_lora() -> Setup:
    base = mlp([32, 128, 128, 10], nn.ReLU)
    pre_opt = torch.optim.Adam(base.parameters(), lr=1e-3)
    data = Batches(*teacher(seed=20), batch=64)
    for i in range(100):  # "pretrained" weights
        x, y = data(i)
        pre_opt.zero_grad()
        F.cross_entropy(base(x), y).backward()
        pre_opt.step()
    for name in ("fc1", "fc2", "fc3"):
        setattr(base, name, LoRALinear(getattr(base, name)))
    x, y = teacher(seed=20)
    y = torch.randperm(10, generator=_gen(21))[y]  # the new task: the same classes under other names
    params = [p for p in base.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3)
    return supervised(base, Batches(x, y, batch=64), opt)


def h_weight_norm() -> Setup:
    model = SmallCNN(nn.ReLU)
    for name in ("conv1", "conv2", "fc1", "fc2"):
        parametrizations.weight_norm(getattr(model, name))
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    return supervised(model, Batches(*images(seed=22), batch=32), opt)


def h_orthogonal_rnn() -> Setup:
    """A hand-written tanh RNN whose recurrent matrix is kept orthogonal (expRNN-style)."""
    class OrthogonalRNN(nn.Module):
        def __init__(self, features: int = 8, hidden: int = 32) -> None:
            super().__init__()
            self.input = nn.Linear(features, hidden)
            self.recurrent = parametrizations.orthogonal(nn.Linear(hidden, hidden, bias=False))
            self.act = nn.Tanh()
            self.head = nn.Linear(hidden, 2)

        def forward(self, x: Tensor) -> Tensor:
            h = x.new_zeros(x.shape[0], self.recurrent.in_features)
            inp = self.input(x)
            with parametrize.cached():  # compute the orthogonal matrix once per forward, not per time step
                for t in range(x.shape[1]):
                    h = self.act(inp[:, t] + self.recurrent(h))
            return self.head(h)

    model = OrthogonalRNN()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    return supervised(model, Batches(*sequences(seed=23), batch=32), opt)


class Swish(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x)


class GELUTanh(nn.Module):
    """The tanh approximation of GELU (as in BERT and GPT-2 code)."""

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def h_custom_activations() -> Setup:
    model = seq(("fc1", nn.Linear(32, 128)), ("swish", Swish()), ("fc2", nn.Linear(128, 128)),
                ("gelu", GELUTanh()), ("fc3", nn.Linear(128, 10)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    setup = supervised(model, Batches(*teacher(seed=24), batch=64), opt)
    setup.watch["functional"] = True  # so the functional taps inside the modules are in play
    return setup


class MeanAggregation(nn.Module):
    """Message passing: each node receives the mean of its neighbours' features (GCN/GraphSAGE style)."""

    def forward(self, x: Tensor, edges: Tensor) -> Tensor:
        out = torch.zeros_like(x).index_add_(0, edges[1], x[edges[0]])
        deg = torch.bincount(edges[1], minlength=x.shape[0]).clamp(min=1)
        return out / deg[:, None].to(x.dtype)


def h_message_passing() -> Setup:
    class GNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin1 = nn.Linear(16, 32)
            self.agg1 = MeanAggregation()
            self.act1 = nn.ReLU()
            self.lin2 = nn.Linear(32, 4)
            self.agg2 = MeanAggregation()

        def forward(self, x: Tensor, edges: Tensor) -> Tensor:
            h = self.act1(self.agg1(self.lin1(x), edges))
            return self.agg2(self.lin2(h), edges)

    x, edges, y = graph()
    model = GNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=5e-4)

    def step(i: int) -> float:  # full-batch node classification
        loss = F.cross_entropy(model(x, edges), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()
    return Setup(model, step)


class Gate(nn.Module):
    """Two inputs: the value and its gate (GLU / highway style)."""

    def forward(self, value: Tensor, gate: Tensor) -> Tensor:
        return value * torch.sigmoid(gate)


def h_gated() -> Setup:
    class GatedMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.value = nn.Linear(32, 128)
            self.gate_proj = nn.Linear(32, 128)
            self.gate = Gate()
            self.out = nn.Linear(128, 10)

        def forward(self, x: Tensor) -> Tensor:
            return self.out(self.gate(self.value(x), self.gate_proj(x)))

    model = GatedMLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return supervised(model, Batches(*teacher(seed=25), batch=64), opt)


def h_two_backward() -> Setup:
    """Multi-task: a shared trunk, two heads, each loss backpropagated on its own, one optimizer step."""
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = mlp([32, 128, 64], nn.ReLU)
            self.trunk.add_module("act2", nn.ReLU())
            self.cls = nn.Linear(64, 10)
            self.reg = nn.Linear(64, 4)

        def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
            h = self.trunk(x)
            return self.cls(h), self.reg(h)

    x, y = teacher(seed=26)
    r = regression(seed=26)[1]
    data = Batches(x, y, r, batch=64)
    model = TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def step(i: int) -> float:
        xb, yb, rb = data(i)
        logits, pred = model(xb)
        ce, mse = F.cross_entropy(logits, yb), F.mse_loss(pred, rb)
        opt.zero_grad()
        ce.backward(retain_graph=True)
        mse.backward()
        opt.step()
        return ce.item() + mse.item()
    return Setup(model, step)


def h_gradient_penalty() -> Setup:
    """Input-gradient penalty (double backpropagation, as in WGAN-GP / R1): autograd.grad with create_graph."""
    model = mlp([32, 128, 128, 10], nn.Softplus)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = Batches(*teacher(seed=27), batch=64)

    def step(i: int) -> float:
        x, y = data(i)
        x = x.clone().requires_grad_(True)
        loss = F.cross_entropy(model(x), y)
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        total = loss + 1.0 * gx.pow(2).sum(1).mean()
        opt.zero_grad()
        total.backward()
        opt.step()
        return total.item()
    return Setup(model, step)


def h_adam_tanh() -> Setup:
    model = mlp([32, 128, 128, 128, 10], nn.Tanh)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight, gain=nn.init.calculate_gain("tanh"))
            nn.init.zeros_(m.bias)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return supervised(model, Batches(*teacher(seed=28), batch=64), opt)


def h_sgd_high_lr() -> Setup:
    """SGD at lr 0.3 with momentum 0.9 on a normalised ReLU MLP: high, but it trains (at lr 0.5 half of act2's
    units really die: that would not be a healthy run)."""
    model = seq(("fc1", nn.Linear(32, 256)), ("bn1", nn.BatchNorm1d(256)), ("act1", nn.ReLU()),
                ("fc2", nn.Linear(256, 256)), ("bn2", nn.BatchNorm1d(256)), ("act2", nn.ReLU()),
                ("fc3", nn.Linear(256, 10)))
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    return supervised(model, Batches(*teacher(seed=29), batch=64), opt)


# ====================================================================== planted pathologies
def p_deep_sigmoid_mlp() -> Setup:
    model = mlp([32] + [64] * 9 + [10], nn.Sigmoid)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return supervised(model, Batches(*teacher(seed=31), batch=64), opt)


def p_deep_sigmoid_mlp_optimizer_given() -> Setup:
    """The deep sigmoid MLP under SGD, with ``optimizer=``: its updates fall with its gradients, so the
    update ratios (which excuse an adaptive optimizer's small gradients) do not excuse these."""
    model = mlp([32] + [64] * 9 + [10], nn.Sigmoid)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    setup = supervised(model, Batches(*teacher(seed=31), batch=64), opt)
    return Setup(model, setup.step, watch={"optimizer": opt})


def p_deep_sigmoid_autoencoder() -> Setup:
    """A deep autoencoder with sigmoid hidden layers (the pre-2006 recipe) and a sigmoid output with BCE."""
    model = mlp([64, 64, 48, 32, 16, 8, 16, 32, 48, 64, 64], nn.Sigmoid)
    model.add_module("out", nn.Sigmoid())
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    x = bitmaps(seed=32)
    return supervised(model, Batches(x, x, batch=64), opt, loss_fn=F.binary_cross_entropy)


def p_tanh_cnn_tiny_init() -> Setup:
    """A plain 6-conv tanh network initialised with N(0, 0.01^2) (the old AlexNet-era default)."""
    pairs: List[Tuple[str, nn.Module]] = []
    ch = 1
    for i in range(6):
        conv = nn.Conv2d(ch, 16, 3, padding=1)
        nn.init.normal_(conv.weight, std=0.01)
        pairs += [(f"conv{i + 1}", conv), (f"tanh{i + 1}", nn.Tanh())]
        if i in (1, 3):
            pairs.append((f"pool{i // 2 + 1}", nn.MaxPool2d(2)))
        ch = 16
    pairs += [("flatten", nn.Flatten()), ("fc", nn.Linear(16 * 4 * 4, 10))]
    model = seq(*pairs)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    return supervised(model, Batches(*images(seed=33), batch=32), opt)


def p_amplifying_stack() -> Setup:
    """ReLU layers fc1-fc6 initialised at 3x the Kaiming scale: each multiplies the signal (and, going back,
    the gradient) by ~3; Adam keeps the updates small, so the run goes on with huge gradients."""
    model = mlp([32] + [128] * 6 + [4], nn.ReLU)
    for name, m in model.named_children():
        if isinstance(m, nn.Linear) and name != "fc7":
            nn.init.normal_(m.weight, std=3 * math.sqrt(2 / m.in_features))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return supervised(model, Batches(*regression(seed=34), batch=64), opt, loss_fn=F.mse_loss)


def p_rnn_huge_init() -> Setup:
    """A vanilla tanh RNN whose recurrent weights have spectral radius ~4, over 50 steps."""
    class RNNRegressor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.RNN(8, 64, batch_first=True)
            nn.init.normal_(self.rnn.weight_hh_l0, std=4 / math.sqrt(64))
            self.head = nn.Linear(64, 1)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.rnn(x)[0]).squeeze(-1)

    x = torch.randn(1024, 50, 8, generator=_gen(35))
    target = x[:, :, 0].cumsum(1) / 10
    model = RNNRegressor()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return supervised(model, Batches(x, target, batch=32), opt, loss_fn=F.mse_loss)


def p_lr_blowup_cnn() -> Setup:
    """SGD with lr 1 and momentum 0.9 on a plain ReLU CNN: the loss reaches ~1e4 by step 10 (gradient norm
    ~4e5) and NaN by step 20."""
    model = SmallCNN(nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    return supervised(model, Batches(*images(seed=36), batch=32), opt)


def p_dead_relu_mlp() -> Setup:
    model = mlp([32, 128, 128, 128, 10], nn.ReLU)
    with torch.no_grad():  # planted: three units in four of act2 never fire; the rest carry the gradient
        model.fc2.bias[torch.arange(128) % 4 != 0] = -5.0
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return supervised(model, Batches(*teacher(seed=37), batch=64), opt)


def p_dead_relu_cnn() -> Setup:
    model = SmallCNN(nn.ReLU)
    with torch.no_grad():  # planted: three channels in four of act2 never fire
        model.conv2.bias[torch.arange(32) % 4 != 0] = -5.0
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    return supervised(model, Batches(*images(seed=38), batch=32), opt)


def p_dead_resnet_shared_relu() -> Setup:
    """The first call site of layer1.0's shared ReLU switched off (BatchNorm shift -5); the second is alive."""
    return resnet_setup(relu_bias=-5.0)


# ---- smooth rectifiers (GELU, SiLU, ELU): dead by slope, not by exact zeros
SMOOTH_DEAD = -20.0
"""The bias that puts a smooth rectifier's planted units far onto its flat side (SiLU(-20) = -4e-8)."""


def _plant(bias: Tensor, value: float = SMOOTH_DEAD) -> None:
    """Four units in five (80 %) get ``value``; the rest carry the gradient."""
    with torch.no_grad():
        bias[torch.arange(bias.numel()) % 5 != 0] = value


class SmoothBlock(nn.Module):
    """A pre-norm transformer block: x + attn(norm1(x)), then x + fc2(act(fc1(norm2(x))))."""

    def __init__(self, d: int, heads: int, act: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d), nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2, self.fc1, self.act, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), act(), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class BlockClassifier(nn.Module):
    """Token embedding, two :class:`SmoothBlock` s, LayerNorm, mean over positions, a linear head."""

    def __init__(self, act: Callable[[], nn.Module], vocab: int = 16, d: int = 32, heads: int = 4,
                 length: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.02)
        self.blocks = nn.Sequential(*[SmoothBlock(d, heads, act) for _ in range(2)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.blocks(self.embed(x) + self.pos)).mean(1))


def smooth_mlp(act: Callable[[], nn.Module], dead: bool, seed: int) -> Setup:
    model = mlp([32, 128, 128, 128, 10], act)
    if dead:  # planted: 80 % of act2's units at a pre-activation near -20
        _plant(model.fc2.bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return supervised(model, Batches(*teacher(seed=seed), batch=64), opt)


def smooth_cnn(dead: bool, seed: int) -> Setup:
    """SmallCNN with in-place SiLU (as EfficientNet and YOLOv5 use it), which overwrites its input."""
    model = SmallCNN(lambda: nn.SiLU(inplace=True))
    if dead:  # planted: 80 % of conv2's channels at about -20
        _plant(model.conv2.bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    return supervised(model, Batches(*images(seed=seed), batch=32), opt)


def smooth_blocks(act: Callable[[], nn.Module], dead: bool, seed: int) -> Setup:
    model = BlockClassifier(act)
    if dead:  # planted: 80 % of the second block's feed-forward units at about -20
        _plant(model.blocks[1].fc1.bias)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return supervised(model, Batches(*tokens(seed=seed), batch=32), opt)


def p_tanh_unnormalised() -> Setup:
    """Inputs left unnormalised (x50, like raw 0..255 pixel values): the first tanh sits on its bounds."""
    model = mlp([32, 128, 128, 10], nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = teacher(seed=41)
    return supervised(model, Batches(50 * x, y, batch=64), opt)


def p_sigmoid_cnn_huge_weights() -> Setup:
    model = SmallCNN(nn.Sigmoid)
    for conv in (model.conv1, model.conv2):
        nn.init.normal_(conv.weight, std=1.0)  # planted: no fan-in scaling
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    return supervised(model, Batches(*images(seed=42), batch=32), opt)


class SoftClip(nn.Module):
    """A user-written squashing function, 2 * sigmoid(x) - 1, written out by hand."""

    def forward(self, x: Tensor) -> Tensor:
        return 2 / (1 + torch.exp(-x)) - 1


def p_user_saturating_conv1d() -> Setup:
    """A Conv1d signal model with a hand-written squashing activation fed 20x too large inputs."""
    model = seq(("conv1", nn.Conv1d(4, 16, 5, padding=2)), ("clip1", SoftClip()),
                ("conv2", nn.Conv1d(16, 16, 5, padding=2)), ("act2", nn.ReLU()),
                ("pool", nn.AdaptiveAvgPool1d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(16, 2)))
    g = _gen(43)
    x = torch.randn(1024, 4, 32, generator=g)
    y = (x[:, 0].mean(1) > 0).long()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return supervised(model, Batches(20 * x, y, batch=32), opt)


class LogCompress(nn.Module):
    """log of features assumed positive (as for spectrogram magnitudes) -- but fed a Linear's output."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.log(x + 1e-6)


def p_nan_log_negative() -> Setup:
    model = seq(("fc1", nn.Linear(32, 64)), ("act1", nn.ReLU()), ("fc2", nn.Linear(64, 64)),
                ("logc", LogCompress()), ("fc3", nn.Linear(64, 10)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return supervised(model, Batches(*teacher(seed=44), batch=64), opt)


class BatchStandardize(nn.Module):
    """Per-batch input standardisation written without an epsilon."""

    def forward(self, x: Tensor) -> Tensor:
        return (x - x.mean()) / x.std()


BLANK_STEP = 152
"""The step at which the image loader of ``p_inf_at_step_cnn`` yields a blank batch (not a measured step)."""


def p_inf_at_step_cnn() -> Setup:
    """A CNN behind an epsilon-free batch standardisation; at step 152 the loader yields a blank batch."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.standardize = BatchStandardize()
            self.cnn = SmallCNN(nn.ReLU)

        def forward(self, x: Tensor) -> Tensor:
            return self.cnn(self.standardize(x))

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    data = Batches(*images(seed=45), batch=32)

    def step(i: int) -> float:
        x, y = data(i)
        if i == BLANK_STEP:
            x = torch.zeros_like(x)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()
    return Setup(model, step)


class MaskedSelfAttention(nn.Module):
    """Multi-head self-attention written by hand, as in many tutorials: padded keys get -inf before the softmax."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.heads = heads

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
        return self.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))


class PaddedTransformer(nn.Module):
    """Pre-norm transformer blocks over variable-length token sequences, mean-pooled over real tokens."""

    def __init__(self, vocab: int = 16, d: int = 32, heads: int = 4, blocks: int = 2, length: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.02)
        self.blocks = nn.ModuleList()
        for _ in range(blocks):
            self.blocks.append(nn.ModuleDict({"norm1": nn.LayerNorm(d), "attn": MaskedSelfAttention(d, heads),
                                              "norm2": nn.LayerNorm(d), "mlp": mlp([d, 2 * d, d], nn.GELU)}))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 2)

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        h = self.embed(x) + self.pos
        for blk in self.blocks:
            h = h + blk["attn"](blk["norm1"](h), padding)
            h = h + blk["mlp"](blk["norm2"](h))
        keep = (~padding).unsqueeze(-1).to(h.dtype)
        return self.head(self.norm((h * keep).sum(1) / keep.sum(1).clamp(min=1)))


EMPTY_STEP = 100
"""The step at which ``p_fully_masked_attention``'s loader yields an empty sequence (a measured step)."""


def p_fully_masked_attention() -> Setup:
    """Variable-length token sequences with a padding mask; at step 100 the batch holds an empty sequence
    (every key masked), whose hand-written softmax over nothing but -inf gives NaN."""
    model = PaddedTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = tokens(seed=46)
    lengths = torch.randint(4, 17, (x.shape[0],), generator=_gen(46))
    data = Batches(x, y, lengths, batch=32)

    def step(i: int) -> float:
        xb, yb, lb = data(i)
        if i == EMPTY_STEP:
            lb = lb.clone()
            lb[0] = 0
        padding = torch.arange(x.shape[1])[None, :] >= lb[:, None]
        loss = F.cross_entropy(model(xb, padding), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()
    return Setup(model, step)


def p_lr_sigmoid_mlp() -> Setup:
    """A user's report: SGD at lr 10 on a sigmoid MLP; the cause is the learning rate."""
    model = mlp([32, 128, 128, 128, 10], nn.Sigmoid)
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    return supervised(model, Batches(*teacher(seed=47), batch=64), opt)


def p_attention_collapse() -> Setup:
    """Query/key projections scaled up 30x: every query attends to one key (entropy collapse)."""
    model = TokenTransformer()
    with torch.no_grad():
        for layer in model.encoder.layers:
            d = layer.self_attn.embed_dim
            layer.self_attn.in_proj_weight[:2 * d] *= 30
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return supervised(model, Batches(*tokens(seed=48), batch=32), opt)


def heavy_tailed(n: int = 2048, dim: int = 32, classes: int = 10, df: int = 3, noise: float = 0.1,
                 seed: int = 8) -> Tuple[Tensor, Tensor]:
    """Student-t inputs (``df`` degrees of freedom: rare samples many standard deviations out), labelled
    by a random tanh teacher, with a share ``noise`` of the labels random."""
    g = _gen(seed)
    z = torch.randn(n, dim, generator=g)
    chi2 = torch.randn(n, dim, df, generator=g).pow(2).sum(-1)
    x = z / (chi2 / df).sqrt()
    w1 = torch.randn(dim, 64, generator=g) / math.sqrt(dim)
    w2 = torch.randn(64, classes, generator=g) / 8
    y = (torch.tanh(x @ w1) @ w2).argmax(1)
    flip = torch.rand(n, generator=g) < noise
    return x, torch.where(flip, torch.randint(classes, (n,), generator=g), y)


def h_noisy_batches() -> Setup:
    """Heavy-tailed inputs, noisy labels and batches of 8: the gradient norm swings from batch to batch,
    as it does on real data; none of it is a spike."""
    model = mlp([32, 128, 128, 10], nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    return supervised(model, Batches(*heavy_tailed(), batch=8), opt)


def h_metric_forwards() -> Setup:
    """After each training step, one more forward in train mode (a running accuracy, computed without
    torch.no_grad): measured steps alternate between steps with gradients and steps without."""
    model = mlp([32, 128, 128, 10], nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return with_metric_forward(supervised(model, Batches(*teacher(seed=18), batch=64), opt))


def with_metric_forward(setup: Setup, data: Optional[Batches] = None) -> Setup:
    """The same training, each step followed by a forward of the next batch without backward."""
    train, model = setup.step, setup.model
    x = teacher(seed=19)[0][:64] if data is None else data(0)[0]

    def step(i: int) -> float:
        loss = train(i)
        model(x)  # a metric's forward: no backward follows it
        return loss
    return Setup(model, step, setup.watch)


CORRUPT_STEP = 150
"""The step at which ``p_corrupt_batch``'s loader yields one batch of unnormalised inputs (a measured step)."""


def p_corrupt_batch() -> Setup:
    """Adam on a ReLU MLP; at step 150 one batch arrives unnormalised (inputs x1000, like raw pixel values):
    a one-step gradient spike behind a loss spike."""
    model = mlp([32, 128, 128, 10], nn.ReLU)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = Batches(*teacher(seed=49), batch=64)

    def step(i: int) -> float:
        x, y = data(i)
        loss = F.cross_entropy(model(x * 1000 if i == CORRUPT_STEP else x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()
    return Setup(model, step)


def p_one_batch_check() -> Setup:
    """One training step on one batch, then a forward of it in train mode to see its loss (no backward):
    the run's last measured step has no gradients. The amplifying stack's gradient must still be named."""
    return with_metric_forward(p_amplifying_stack(), Batches(*regression(seed=34), batch=64))


def p_embedding_transformer_blowup() -> Setup:
    """AdamW at lr 0.1 on a token transformer with a 1,000-token vocabulary: every encoder layer's weights
    triple within a few steps, while the embedding (std-1 init, most of the weights' norm; rows of tokens
    not seen get no update) barely moves."""
    model = TokenTransformer(vocab=1000)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return supervised(model, Batches(*tokens(seed=50), batch=32), opt)


SPIKE_STEPS = range(100, 103)
"""The steps at which ``p_lr_spike_dead_relu`` trains at a learning rate 200x too high."""


def p_lr_spike_dead_relu() -> Setup:
    """SGD on a ReLU MLP; at steps 100-102 the learning rate spikes from 0.05 to 10 (a schedule bug), then
    returns to normal. The weights stop growing, but most units of two ReLU layers stay dead."""
    model = mlp([32, 128, 128, 128, 10], nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    train = supervised(model, Batches(*teacher(seed=51), batch=64), opt).step

    def step(i: int) -> float:
        for group in opt.param_groups:
            group["lr"] = 10.0 if i in SPIKE_STEPS else 0.05
        return train(i)
    return Setup(model, step)


class LSTMCellByHand(nn.Module):
    """An LSTM cell written out, as in tutorials: one ``gate`` sigmoid module called for three gates."""

    def __init__(self, inputs: int, hidden: int) -> None:
        super().__init__()
        self.lin = nn.Linear(inputs + hidden, 4 * hidden)
        self.gate, self.cand = nn.Sigmoid(), nn.Tanh()

    def forward(self, x: Tensor, h: Tensor, c: Tensor) -> Tuple[Tensor, Tensor]:
        i, f, g, o = self.lin(torch.cat([x, h], -1)).chunk(4, -1)
        c = self.gate(f) * c + self.gate(i) * self.cand(g)
        return self.gate(o) * torch.tanh(c), c


def p_unrolled_cell_unnormalised() -> Setup:
    """A hand-written LSTM cell unrolled over 20 time steps, fed unnormalised inputs (x20): its gates
    saturate at every one of their 60 call sites, which make one finding."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell, self.head = LSTMCellByHand(8, 32), nn.Linear(32, 2)

        def forward(self, x: Tensor) -> Tensor:
            h = c = x.new_zeros(x.shape[0], 32)
            for t in range(x.shape[1]):
                h, c = self.cell(x[:, t], h, c)
            return self.head(h)

    x, y = sequences(seed=52)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return supervised(model, Batches(20 * x, y, batch=32), opt)


NAN_BACKWARD_STEP = 100
"""The step at which ``p_nan_in_backward`` takes sqrt(0) in its loss (a measured step)."""


def p_nan_in_backward() -> Setup:
    """fp32, no loss scaler: at step 100 a loss term takes sqrt of a value that is exactly 0 -- finite
    forward, NaN gradient (the slope of sqrt at 0 is infinite), which SGD then applies."""
    model = mlp([32, 64, 64, 10], nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = Batches(*teacher(seed=53), batch=64)

    def step(i: int) -> float:
        x, y = data(i)
        out = model(x)
        loss = F.cross_entropy(out, y)
        if i == NAN_BACKWARD_STEP:
            loss = loss + torch.sqrt(out[:, :1].relu() * 0).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()
    return Setup(model, step)


def shifts(n: int = 1024, length: int = 17, vocab: int = 16, seed: int = 49) -> Tuple[Tensor, Tensor]:
    """Language modelling: each sequence counts up from a random token by its own random step (mod
    ``vocab``); the next token follows from the ones before. Inputs and next-token targets."""
    g = _gen(seed)
    start, step = torch.randint(vocab, (n, 1), generator=g), torch.randint(1, 4, (n, 1), generator=g)
    seq_ = (start + step * torch.arange(length)) % vocab
    return seq_[:, :-1], seq_[:, 1:]


class CausalSelfAttention(nn.Module):
    """nanoGPT's: one qkv projection, F.scaled_dot_product_attention(is_causal=True) with dropout."""

    def __init__(self, d: int, heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.c_attn(x).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class NanoGPT(nn.Module):
    """nanoGPT at toy size: pre-norm blocks (LayerNorm, SDPA attention, GELU MLP), tied embeddings."""

    def __init__(self, vocab: int = 16, d: int = 64, heads: int = 4, layers: int = 2, length: int = 16) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(length, d)
        self.h = nn.ModuleList(nn.ModuleDict({"ln_1": nn.LayerNorm(d), "attn": CausalSelfAttention(d, heads),
                                              "ln_2": nn.LayerNorm(d),
                                              "mlp": nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))})
                               for _ in range(layers))
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():  # nanoGPT's initialisation
            if name.endswith("weight") and p.dim() == 2:
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers) if name.endswith("c_proj.weight") else 0.02)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = x + block["attn"](block["ln_1"](x))
            x = x + block["mlp"](block["ln_2"](x))
        return self.lm_head(self.ln_f(x))


def _next_token_loss(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def h_nanogpt() -> Setup:
    model = NanoGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    return supervised(model, Batches(*shifts(), batch=32), opt, loss_fn=_next_token_loss)


def p_nanogpt_collapse() -> Setup:
    """The second block's query and key projections scaled up 30x (SDPA): one-hot attention there."""
    model = NanoGPT()
    with torch.no_grad():
        model.h[1]["attn"].c_attn.weight[:2 * 64] *= 30
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    return supervised(model, Batches(*shifts(seed=50), batch=32), opt, loss_fn=_next_token_loss)


def p_hf_gpt2_collapse() -> Setup:
    """A Hugging Face GPT-2 built from a config (width 64, 2 layers, SDPA), the second layer's query and
    key projections scaled up 30x. The loss it computes is the user's; the optimizer is handed over."""
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=16, n_positions=16, n_embd=64, n_layer=2,
                                                                 n_head=4, bos_token_id=0, eos_token_id=0))
    with torch.no_grad():
        model.transformer.h[1].attn.c_attn.weight[:, :2 * 64] *= 30  # Conv1D (in, 3 * out): q and k first
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = Batches(*shifts(seed=51), batch=32)

    def step(i: int) -> float:
        x, _ = data(i)
        loss = model(input_ids=x, labels=x).loss  # (the model shifts the labels by one token itself)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()
    return Setup(model, step, watch={"optimizer": opt})


# ====================================================================== the list
V, E, D, S, N, L, A, H = (FindingKind.VANISHING, FindingKind.EXPLODING, FindingKind.DEAD_UNITS,
                          FindingKind.SATURATION, FindingKind.NON_FINITE, FindingKind.LEARNING_RATE,
                          FindingKind.ATTENTION_COLLAPSE, FindingKind.FP16_OVERFLOW)

CASES: List[Case] = [
    # ---- healthy: must raise nothing
    Case("conv-relu", "convolutional", "2-conv ReLU CNN, SGD+momentum", h_conv_relu),
    Case("resnet-shared-relu", "residual", "ResNet BasicBlocks, one nn.ReLU called at two sites per block",
         lambda: resnet_setup()),
    Case("resnet-zero-init-residual", "residual", "same, last BatchNorm of each block zero-initialised "
         "(torchvision zero_init_residual)", lambda: resnet_setup(zero_init_residual=True)),
    Case("lstm-classifier", "recurrent", "LSTM sequence classifier, Adam, gradient clipping", h_lstm),
    Case("gru-seq2seq", "recurrent", "2-layer GRU, running-mean regression at every step", h_gru),
    Case("transformer-encoder", "attention", "nn.TransformerEncoder (2 layers, 4 heads) token classifier, AdamW",
         h_transformer),
    Case("nanogpt-sdpa", "attention", "nanoGPT-style causal LM: F.scaled_dot_product_attention with dropout, "
         "tied embeddings, AdamW", h_nanogpt),
    Case("batchnorm-mlp", "normalisation", "Linear-BatchNorm-ReLU MLP, SGD lr 0.1", h_batchnorm_mlp),
    Case("user-layernorm-blocks", "normalisation", "pre-norm residual MLP blocks with a hand-written LayerNorm "
         "and a parameter-free hand-written RMSNorm", h_user_layernorm),
    Case("l2-normalised-embeddings", "normalisation", "embedding net with a parameter-free L2Normalize module "
         "and a cosine classifier", h_normalised_embeddings),
    Case("autoencoder-sigmoid-bce", "autoencoder", "MLP autoencoder on binary bitmaps, sigmoid output + BCE",
         h_autoencoder_sigmoid),
    Case("autoencoder-softmax-ce", "autoencoder", "categorical autoencoder, nn.Softmax output + log/NLL loss",
         h_autoencoder_softmax),
    Case("amp-fp16-gradscaler", "mixed precision", "CNN under autocast(cpu, float16) with GradScaler('cpu')",
         h_amp_fp16),
    Case("amp-bf16-gradscaler", "mixed precision", "LayerNorm MLP under autocast(cpu, bfloat16) with "
         "GradScaler('cpu'); optimizer= passed to GradWatch", h_amp_bf16),
    Case("amp-fp16-residual-mlp", "mixed precision", "pre-norm residual MLP under autocast(cpu, float16), AdamW, "
         "GradScaler('cpu') passed as scaler=", lambda: fp16_residual(half=False, seed=60)),
    Case("amp-fp16-nanogpt", "mixed precision", "nanoGPT-style LM (SDPA) under autocast(cpu, float16), AdamW, "
         "GradScaler('cpu') not passed, optimizer= passed", h_amp_fp16_nanogpt),
    Case("half-residual-mlp", "mixed precision", "the residual MLP in .half() (float16 weights and "
         "gradients, no loss scaler), SGD+momentum", lambda: fp16_residual(half=True, seed=61)),
    Case("finetune-zero-head", "fine-tuning", "pretrained MLP backbone, new zero-initialised head", h_finetune_zero_head),
    Case("lora-zero-b", "fine-tuning", "frozen pretrained MLP with LoRA adapters (B initialised to zero)", h_lora),
    Case("weight-norm-cnn", "parametrized", "CNN with parametrizations.weight_norm on every layer", h_weight_norm),
    Case("orthogonal-rnn", "parametrized", "hand-written tanh RNN, recurrent matrix parametrizations.orthogonal",
         h_orthogonal_rnn),
    Case("custom-swish-gelu-tanh", "custom modules", "hand-written Swish and GELU (tanh approximation) modules, "
         "functional=True", h_custom_activations),
    Case("gelu-mlp", "MLP", "GELU MLP 32-128-128-128-10, SGD+momentum",
         lambda: smooth_mlp(nn.GELU, dead=False, seed=60)),
    Case("silu-inplace-cnn", "convolutional", "2-conv CNN with nn.SiLU(inplace=True), SGD+momentum",
         lambda: smooth_cnn(dead=False, seed=61)),
    Case("silu-transformer-blocks", "attention", "two pre-norm blocks (LayerNorm, MHA, SiLU MLP), AdamW",
         lambda: smooth_blocks(nn.SiLU, dead=False, seed=62)),
    Case("message-passing-gnn", "custom modules", "2-layer GNN with a hand-written mean-aggregation module",
         h_message_passing),
    Case("gated-two-input", "custom modules", "hand-written two-input Gate module: value * sigmoid(gate)", h_gated),
    Case("two-backward-passes", "training loop", "shared trunk, two heads, two backward() calls per step",
         h_two_backward),
    Case("gradient-penalty", "training loop", "input-gradient penalty via autograd.grad(create_graph=True)",
         h_gradient_penalty),
    Case("adam-tanh-mlp", "optimizer", "Xavier-initialised tanh MLP, Adam lr 1e-3", h_adam_tanh),
    Case("sgd-high-lr", "optimizer", "BatchNorm ReLU MLP, SGD lr 0.3 momentum 0.9 (high, but it trains)",
         h_sgd_high_lr),
    Case("noisy-small-batches", "data", "Student-t (3 d.o.f.) inputs, 10 % label noise, batches of 8, SGD+momentum",
         h_noisy_batches),
    Case("metric-forwards", "training loop", "a train-mode forward without backward after each training step",
         h_metric_forwards),
    # ---- planted: must be named with the right kind and layer
    Case("deep-sigmoid-mlp", "MLP", "10 sigmoid layers, default init", p_deep_sigmoid_mlp,
         expect=((V, "fc1"),)),
    Case("deep-sigmoid-mlp-optimizer-given", "MLP", "10 sigmoid layers, default init, SGD passed as optimizer=",
         p_deep_sigmoid_mlp_optimizer_given,
         expect=((V, "fc1"),)),
    Case("deep-sigmoid-autoencoder", "autoencoder", "10 sigmoid layers between input and code and back",
         p_deep_sigmoid_autoencoder, expect=((V, "fc1"),)),
    Case("tanh-cnn-tiny-init", "convolutional", "6 tanh conv layers initialised N(0, 0.01^2)",
         p_tanh_cnn_tiny_init, expect=((V, "conv1"),)),
    Case("amplifying-relu-stack", "MLP", "fc1-fc6 (ReLU) at 3x the Kaiming scale, fc7 default; Adam",
         p_amplifying_stack,
         expect=((E, "fc[1-6]"),)),
    Case("rnn-huge-init", "recurrent", "tanh RNN, recurrent weights with spectral radius ~4, 50 steps, Adam",
         p_rnn_huge_init, expect=((E, "rnn"),)),
    Case("lr-blowup-cnn", "convolutional", "CNN, SGD lr 1.0 momentum 0.9: diverges, NaN by step 20",
         p_lr_blowup_cnn,
         expect=((L, "*"),)),
    Case("dead-relu-mlp", "MLP", "bias -5 on 3 of 4 units of fc2, before act2", p_dead_relu_mlp,
         expect=((D, "act2*"),)),
    Case("dead-relu-cnn", "convolutional", "bias -5 on 3 of 4 channels of conv2, before act2", p_dead_relu_cnn,
         expect=((D, "act2*"),)),
    Case("dead-resnet-first-call-site", "residual", "BatchNorm shift -5 before the first call of a shared ReLU "
         "(the second call is alive)", p_dead_resnet_shared_relu, expect=((D, "layer1.0.relu*"),)),
    Case("dead-gelu-mlp", "MLP", f"bias {SMOOTH_DEAD:g} on 4 of 5 units of fc2, before a GELU",
         lambda: smooth_mlp(nn.GELU, dead=True, seed=63), expect=((D, "act2"),)),
    Case("dead-elu-mlp", "MLP", f"bias {SMOOTH_DEAD:g} on 4 of 5 units of fc2, before an ELU",
         lambda: smooth_mlp(nn.ELU, dead=True, seed=64), expect=((D, "act2"),)),
    Case("dead-silu-inplace-cnn", "convolutional", f"bias {SMOOTH_DEAD:g} on 4 of 5 channels of conv2, before "
         "an in-place SiLU", lambda: smooth_cnn(dead=True, seed=65), expect=((D, "act2"),)),
    Case("dead-gelu-transformer-block", "attention", f"bias {SMOOTH_DEAD:g} on 4 of 5 feed-forward units of "
         "the second block, before its GELU", lambda: smooth_blocks(nn.GELU, dead=True, seed=66),
         expect=((D, "blocks.1.act"),)),
    Case("tanh-unnormalised-inputs", "MLP", "inputs x50 into a tanh MLP", p_tanh_unnormalised,
         expect=((S, "act1"),)),
    Case("sigmoid-cnn-huge-weights", "convolutional", "sigmoid CNN, conv weights N(0, 1)",
         p_sigmoid_cnn_huge_weights, expect=((S, "act2"),)),
    Case("user-softclip-conv1d", "custom modules", "hand-written 2*sigmoid-1 after a Conv1d fed x20 inputs",
         p_user_saturating_conv1d, expect=((S, "clip1"),)),
    Case("nan-log-of-negative", "MLP", "a log() module fed a Linear's output", p_nan_log_negative,
         expect=((N, "logc"),)),
    Case("nan-at-step-152-cnn", "convolutional", "epsilon-free batch standardisation, one blank batch at step "
         f"{BLANK_STEP} (between measured steps)", p_inf_at_step_cnn, expect=((N, "standardize"),)),
    Case("nan-fully-masked-attention", "attention", "hand-written masked attention; an empty sequence at step "
         f"{EMPTY_STEP} makes its softmax NaN", p_fully_masked_attention, expect=((N, "blocks.0.attn*"),)),
    Case("lr-10-sigmoid-mlp", "MLP", "SGD lr 10 on a sigmoid MLP: the learning rate is the cause; the sigmoids it "
         "leaves saturated are named with it", p_lr_sigmoid_mlp, expect=((L, "*"), (S, "act*"))),
    Case("attention-qk-x30", "attention", "query/key projections scaled x30: one-hot attention",
         p_attention_collapse, expect=((A, "encoder.layers.*.self_attn"),)),
    Case("corrupt-batch-spike", "data", f"one batch of unnormalised inputs (x1000) at step {CORRUPT_STEP}, Adam",
         p_corrupt_batch, expect=((E, "fc1"),)),
    Case("one-batch-check", "training loop", "one training step of the amplifying stack, then a forward without "
         "backward (every=1): the last measured step has no gradients", p_one_batch_check, expect=((E, "fc[1-6]"),),
         steps=1, every=1),
    Case("amplifying-stack-metric-forwards", "training loop", "the amplifying stack, each step followed by a "
         "forward without backward: measured steps alternate with and without gradients",
         lambda: with_metric_forward(p_amplifying_stack(), Batches(*regression(seed=34), batch=64)),
         expect=((E, "fc[1-6]"),)),
    Case("transformer-blowup-behind-embedding", "attention", "AdamW lr 0.1 on a token transformer: encoder "
         "layers' weights triple while the std-1 embedding holds most of the weights' norm",
         p_embedding_transformer_blowup, expect=((L, "*"), (A, "encoder.layers.*.self_attn"))),
    Case("lr-spike-dead-relu", "optimizer", f"SGD, learning rate 10 instead of 0.05 at steps {SPIKE_STEPS.start}-"
         f"{SPIKE_STEPS.stop - 1}: units of two ReLU layers stay dead after it", p_lr_spike_dead_relu,
         expect=((L, "*"), (D, "act*"))),
    Case("unrolled-lstm-cell", "recurrent", "hand-written LSTM cell unrolled 20 times, inputs x20: one gate "
         "module at 60 call sites", p_unrolled_cell_unnormalised, expect=((S, "cell.gate"), (S, "cell.cand"))),
    Case("nan-in-backward-fp32", "MLP", f"sqrt(0) in the loss at step {NAN_BACKWARD_STEP}: finite forward, NaN "
         "gradient, no loss scaler", p_nan_in_backward, expect=((N, "*"),)),
    Case("nanogpt-sdpa-qk-x30", "attention", "nanoGPT-style LM (SDPA), second block's query/key projections x30",
         p_nanogpt_collapse, expect=((A, "h.1.attn"),), steps=100),
    Case("hf-gpt2-qk-x30", "attention", "Hugging Face GPT2LMHeadModel from a config (SDPA), second layer's "
         "query/key projections x30", p_hf_gpt2_collapse,
         expect=((A, "transformer.h.1.attn"),), steps=60),
    Case("fp16-outlier-feature-autocast", "mixed precision", "residual MLP under autocast(cpu, float16) with a "
         "GradScaler (scaler=): feature 7 of blocks.1.fc2's output x1.1 a step until it overflows",
         lambda: fp16_residual(half=False, seed=60, grow=1),
         expect=((H, "blocks.1.fc2"), (N, "blocks.1.fc2")), ahead=((H, N),)),
    Case("fp16-outlier-feature-half", "mixed precision", "residual MLP in .half(), SGD: feature 7 of "
         "blocks.0.fc2's output x1.1 a step until it overflows", lambda: fp16_residual(half=True, seed=61, grow=0),
         expect=((H, "blocks.0.fc2"), (N, "blocks.0.fc2")), ahead=((H, N),)),
]


# ====================================================================== running
@dataclass
class Outcome:
    case: Case
    findings: List[Any] = field(default_factory=list)  # gradwatch Finding objects
    notices: List[str] = field(default_factory=list)  # GradWatchWarnings that are not findings
    losses: List[float] = field(default_factory=list)
    seconds: float = 0.0
    error: Optional[str] = None
    skipped: Optional[str] = None
    steps: int = 0

    def late(self) -> List[Tuple[FindingKind, FindingKind]]:
        """The case's ``ahead`` pairs (a, b) where a's first finding did not come at an earlier step
        than b's first (or never came while b did)."""
        first: Dict[FindingKind, int] = {}
        for f in self.findings:
            first[f.kind] = min(first.get(f.kind, f.step), f.step)
        pairs = [tuple(k if isinstance(k, FindingKind) else FindingKind(k) for k in pair) for pair in self.case.ahead]
        return [(a, b) for a, b in pairs if b in first and not first.get(a, math.inf) < first[b]]

    def matched(self) -> Dict[Tuple[FindingKind, str], bool]:
        return {(k, p): any(f.kind == k and fnmatch.fnmatchcase(f.layer, p) for f in self.findings)
                for k, p in self.case.expectations()}

    def unexpected(self) -> List[Any]:
        """Findings no expectation covers: false alarms."""
        exp = self.case.expectations()
        return [f for f in self.findings if not any(f.kind == k and fnmatch.fnmatchcase(f.layer, p) for k, p in exp)]

    @property
    def verdict(self) -> str:
        if self.skipped:
            return "skipped"
        if self.error:
            return "error"
        missed = [e for e, ok in self.matched().items() if not ok]
        extra = self.unexpected()
        if self.case.healthy:
            return "false alarm" if extra else "pass"
        if missed and extra:
            return "misnamed" if any(f.kind in {k for k, _ in missed} for f in extra) else "missed + false alarm"
        if missed:
            return "missed"
        if self.late():
            return "named too late"
        return "pass + extra findings" if extra else "pass"

    @property
    def ok(self) -> bool:
        return self.verdict in ("pass", "skipped")


def _seed(seed: int = 0) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def run_case(case: Case, steps: Optional[int] = None) -> Outcome:
    """Build and train one case under GradWatch; collect its findings (and any other gradwatch warnings)."""
    out = Outcome(case)
    missing = case.missing_kinds()
    if missing:
        out.skipped = f"finding kind {', '.join(missing)} not in this gradwatch"
        return out
    steps = case.steps if steps is None else steps
    _seed(0)
    t0 = time.perf_counter()
    try:
        setup = case.build()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            watch = GradWatch(setup.model, every=case.every, quiet=True, **setup.watch)
            with watch:
                for i in range(steps):
                    out.losses.append(setup.step(i))
                    out.steps = i + 1
        out.findings = list(watch.findings)
        finding_categories = tuple({c for c in (getattr(k, "category", None) for k in FindingKind)
                                    if isinstance(c, type)})
        out.notices = sorted({str(w.message) for w in caught
                              if issubclass(w.category, GradWatchWarning)
                              and not issubclass(w.category, finding_categories)})
    except Exception as exc:  # noqa: BLE001 -- one broken case must not end the suite
        out.error = f"{type(exc).__name__}: {exc}"
    out.seconds = time.perf_counter() - t0
    return out


# ====================================================================== scoring and output
def score(outcomes: Sequence[Outcome]) -> Dict[FindingKind, Dict[str, int]]:
    """TP/FP/FN per finding kind over (case, kind) pairs (see the module docstring)."""
    table = {k: {"tp": 0, "fp": 0, "fn": 0} for k in FindingKind}
    for o in outcomes:
        if o.skipped or o.error:
            continue
        for (kind, _), ok in o.matched().items():
            table[kind]["tp" if ok else "fn"] += 1
        for kind in {f.kind for f in o.unexpected()}:
            table[kind]["fp"] += 1
    return table


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.2f}" if b else "–"


def _loss_trend(losses: List[float]) -> str:
    if not losses:
        return ""
    k = max(1, min(10, len(losses) // 5))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return f"{first:.3g} → {last:.3g}"


def _finding_text(f: Any) -> str:
    return f"{f.kind.value} @ {f.layer} (step {f.step})"


def _findings_summary(o: Outcome, limit: int = 4) -> str:
    if o.skipped:
        return o.skipped
    if o.error:
        return o.error
    seen: Dict[Tuple[str, str], Any] = {}
    for f in o.findings:
        seen.setdefault((f.kind.value, f.layer), f)
    items = [_finding_text(f) for f in seen.values()]
    more = f"; and {len(items) - limit} more" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more if items else "none"


def _expect_text(case: Case) -> str:
    if case.healthy:
        return "nothing"
    name = lambda k: k.value if isinstance(k, FindingKind) else k  # noqa: E731
    order = "".join(f" ({name(a)} before {name(b)})" for a, b in case.ahead)
    return ", ".join(f"{name(k)} @ {p}" for k, p in case.expect) + order


def machine() -> str:
    """CPU model, cores, threads, versions: no host name, no paths."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return (f"{cpu}, {os.cpu_count()} cores, {threads} torch thread{'s' if threads != 1 else ''}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, {platform.system()}")


def rich_table(outcomes: Sequence[Outcome]) -> Any:
    from rich.table import Table

    t = Table(title="gradwatch accuracy", show_lines=False)
    for col in ("case", "family", "expected", "verdict", "findings", "loss first → last", "s"):
        t.add_column(col, overflow="fold")
    style = {"pass": "green", "skipped": "dim", "false alarm": "red", "missed": "red", "misnamed": "red",
             "error": "bold red"}
    for o in outcomes:
        v = o.verdict
        t.add_row(o.case.name, o.case.family, _expect_text(o.case), f"[{style.get(v, 'yellow')}]{v}[/]",
                  _findings_summary(o), _loss_trend(o.losses), f"{o.seconds:.1f}")
    return t


def rich_scores(scores: Dict[FindingKind, Dict[str, int]]) -> Any:
    from rich.table import Table

    t = Table(title="per finding kind")
    for col in ("kind", "TP", "FP", "FN", "precision", "recall"):
        t.add_column(col)
    for k, c in scores.items():
        t.add_row(k.value, str(c["tp"]), str(c["fp"]), str(c["fn"]), _ratio(c["tp"], c["tp"] + c["fp"]),
                  _ratio(c["tp"], c["tp"] + c["fn"]))
    return t


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(outcomes: Sequence[Outcome], scores: Dict[FindingKind, Dict[str, int]], command: str,
             total: float) -> str:
    healthy = [o for o in outcomes if o.case.healthy]
    planted = [o for o in outcomes if not o.case.healthy]
    alarms = [o for o in healthy if not o.ok]
    missed = [o for o in planted if not o.ok]
    lines = [
        "# Accuracy",
        "",
        "<!-- Generated by benchmarks/accuracy.py; edit that script, not this page. -->",
        "",
        "Does gradwatch stay silent on healthy training, and name the cause when something is wrong? "
        "`benchmarks/accuracy.py` trains small models for a few hundred steps each on synthetic data "
        f"(CPU, fixed seeds) under `GradWatch(model, every={DEFAULT_EVERY}, quiet=True)` (unless a case says "
        "otherwise) and compares the "
        "findings with what each case expects: nothing for a **healthy** setup, a finding of the right "
        "kind naming the right layer for a **planted** pathology.",
        "",
        f"    {command}",
        "",
        f"Machine: {machine()}. Total time: {total:.0f} s. The findings do not depend on the machine's speed "
        f"(`every` is fixed, so no interval adapts to timing): the same code gives the same table.",
        "",
        f"**Healthy setups: {len(healthy) - len(alarms)} of {len(healthy)} silent. "
        f"Planted pathologies: {sum(1 for o in planted if o.verdict.startswith('pass'))} of "
        f"{len([o for o in planted if not o.skipped])} named"
        + (f" ({len([o for o in planted if o.skipped])} skipped: kinds not in this gradwatch yet)"
           if any(o.skipped for o in planted) else "") + ".**",
        "",
        "## Precision and recall per finding kind",
        "",
        "Counted over (case, kind) pairs: an expected kind and layer pattern of a planted case is a true "
        "positive (TP) when a finding of that kind names a matching layer, else a false negative (FN); a case "
        "adds one false positive (FP) for a kind when it raised a finding of that kind that none of its "
        "expectations covers — on a healthy case, any finding.",
        "",
        "| kind | TP | FP | FN | precision | recall |",
        "|---|---|---|---|---|---|",
    ]
    for k, c in scores.items():
        lines.append(f"| {k.value} | {c['tp']} | {c['fp']} | {c['fn']} | {_ratio(c['tp'], c['tp'] + c['fp'])} | "
                     f"{_ratio(c['tp'], c['tp'] + c['fn'])} |")
    for title, group in (("Healthy setups", healthy), ("Planted pathologies", planted)):
        lines += ["", f"## {title}", "",
                  "| case | family | setup | expected | verdict | findings (kind @ layer, first step) | "
                  "loss, first → last 10 steps |",
                  "|---|---|---|---|---|---|---|"]
        for o in group:
            lines.append(f"| `{o.case.name}` | {o.case.family} | {_md(o.case.about)} | {_md(_expect_text(o.case))} | "
                         f"{'**' + o.verdict + '**' if not o.ok else o.verdict} | {_md(_findings_summary(o, 6))} | "
                         f"{_loss_trend(o.losses)} |")
    if alarms or missed:
        lines += ["", "## What the failing cases were told", "",
                  "The first finding of each kind and layer, as gradwatch worded it."]
        for o in alarms + missed:
            lines += ["", f"**`{o.case.name}`** ({o.verdict}; expected {_expect_text(o.case)}):", ""]
            if o.error:
                lines.append(f"- error: {_md(o.error)}")
            seen = set()
            for f in o.findings:
                if (f.kind, f.layer) in seen:
                    continue
                seen.add((f.kind, f.layer))
                lines.append(f"- {f.kind.value} @ `{f.layer}`, step {f.step}: {_md(f.message)}")
            if not o.findings and not o.error:
                lines.append("- no finding")
    notices = [(o, n) for o in outcomes for n in o.notices]
    if notices:
        lines += ["", "## Other gradwatch notices", ""]
        lines += [f"- `{o.case.name}`: {_md(n)}" for o, n in notices]
    lines += ["", "## Adding a case", "",
              "Append a `Case(name, family, about, build, expect=...)` to `CASES` in `benchmarks/accuracy.py`. "
              "`build()` returns a `Setup(model, step)`, where `step(i)` runs training step `i` and returns the "
              "loss. `expect` is empty for a healthy setup, else `(FindingKind, layer-name glob)` pairs; a kind "
              "may be given as a string before gradwatch has it, and the case is skipped until then. "
              "`tests/test_accuracy.py` runs a few fast cases in the unit tests.", ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these cases (names or globs)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--quick", action="store_true", help="a third of the steps (smoke run)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: these models are too small to gain from a second thread, "
                             "and on a busy machine threads waiting for each other cost several times the step)")
    parser.add_argument("--write", action=argparse.BooleanOptionalAction, default=None,
                        help="write docs/accuracy.md (default: only for a full run of every case)")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    if not console.is_terminal:  # piped to a file: wide enough for the table
        console = Console(width=180)
    if args.list:
        for c in CASES:
            print(f"{c.name:30s} {'healthy' if c.healthy else 'planted'}  {c.family:16s} "
                  f"expects {_expect_text(c)}: {c.about}")
        return 0
    cases = CASES
    if args.only:
        cases = [c for c in CASES if any(fnmatch.fnmatchcase(c.name, p) for p in args.only)]
        unknown = [p for p in args.only if not any(fnmatch.fnmatchcase(c.name, p) for c in CASES)]
        if unknown:
            parser.error(f"no case named {unknown}; see --list")
    torch.set_num_threads(args.threads)
    write = args.write if args.write is not None else (not args.only and not args.quick)

    outcomes: List[Outcome] = []
    t0 = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("accuracy", total=len(cases))
        for case in cases:
            progress.update(task, description=f"[bold]{case.name}[/]")
            steps = max(1, case.steps // 3) if args.quick else None
            outcomes.append(run_case(case, steps))
            progress.advance(task)
    total = time.perf_counter() - t0

    scores = score(outcomes)
    console.print(rich_table(outcomes))
    console.print(rich_scores(scores))
    alarms = [o for o in outcomes if o.case.healthy and not o.ok]
    errors = [o for o in outcomes if o.error]
    missed = [o for o in outcomes if not o.case.healthy and not o.ok]
    console.print(f"{len(outcomes)} cases in {total:.0f} s ({machine()})", highlight=False)
    if write:
        command = "python benchmarks/accuracy.py" + (f" --threads {args.threads}" if args.threads != 1 else "")
        DOC.write_text(markdown(outcomes, scores, command, total))
        console.print(f"wrote {DOC.relative_to(Path.cwd()) if DOC.is_relative_to(Path.cwd()) else DOC.name}")
    extra = [o for o in missed if o.verdict == "pass + extra findings"]
    missed = [o for o in missed if o not in extra and not o.skipped]
    if missed:
        console.print(f"[yellow]planted cases missed or misnamed: {', '.join(o.case.name for o in missed)}[/]")
    if extra:
        console.print(f"[yellow]planted cases named, with extra findings: {', '.join(o.case.name for o in extra)}[/]")
    if alarms or errors:
        bad = ", ".join(o.case.name for o in alarms + errors)
        console.print(f"[red]healthy cases that warned or cases that failed: {bad}[/]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
