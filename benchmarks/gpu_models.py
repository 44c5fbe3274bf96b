"""gradwatch on real-size models: a ResNet-50-sized CNN and a GPT-2-small-sized transformer.

    python benchmarks/gpu_models.py                      # on a CUDA device (the figures of record)
    python benchmarks/gpu_models.py --tiny --device cpu  # the same code at tiny sizes (a smoke run)

Models: ResNet-50 (bottleneck blocks 3-4-6-3, 25.6M parameters) on 224x224 images, batch 128,
under bf16 autocast; GPT-2 small (12 layers, 12 heads, width 768, 124M parameters with the
embeddings tied to the head) on sequences of 1024 tokens, batch 8, under bf16 autocast, with
``F.scaled_dot_product_attention``. Each trains with AdamW.

For each model, the variants train their own copy (same initial weights), interleaved block by
block in a shuffled order; a variant's ratio is the median over rounds of its block time over the
unwatched copy's in the same round:

- unwatched (its step time is printed);
- gradwatch at its defaults, every step (scalars), every step with histograms (every step);
- compiled (``torch.compile``, watched before compiling) at its defaults and every step, beside
  a compiled unwatched copy, which is their baseline.

Per variant it also reports peak memory over the timed blocks (``torch.cuda.max_memory_allocated``,
reset before each block; on the CPU: not measured) and the host synchronisations of one measured
step: on CUDA, ``torch.cuda.set_sync_debug_mode("warn")`` makes every synchronising call PyTorch
makes (``.item()``, ``.tolist()``, ``.cpu()``, a non-blocking copy's wait, ...) raise a warning,
and the warnings during one step are counted, less those the unwatched step makes. On the CPU
there is nothing to synchronise with: reported as "-".
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import statistics
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------- GPT
@dataclass(frozen=True)
class GPTConfig:
    """nanoGPT's configuration; the defaults are GPT-2 small (124M parameters)."""

    vocab_size: int = 50304  # GPT-2's 50257, padded to a multiple of 64 as nanoGPT does
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.resid_dropout = nn.Dropout(c.dropout)
        self.n_head, self.dropout = c.n_head, c.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, e = x.shape
        q, k, v = self.c_attn(x).split(e, dim=2)
        q, k, v = (z.view(b, t, self.n_head, e // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(b, t, e)))


class MLP(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(c.n_embd, bias=c.bias), CausalSelfAttention(c)
        self.ln_2, self.mlp = nn.LayerNorm(c.n_embd, bias=c.bias), MLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT's model: learned positions, pre-norm blocks, the token embedding tied to the head.
    ``forward(idx, targets)`` returns ``(logits, loss)``, loss None without targets."""

    def __init__(self, c: GPTConfig = GPTConfig()) -> None:
        super().__init__()
        self.config = c
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.n_embd), wpe=nn.Embedding(c.block_size, c.n_embd),
            drop=nn.Dropout(c.dropout), h=nn.ModuleList([Block(c) for _ in range(c.n_layer)]),
            ln_f=nn.LayerNorm(c.n_embd, bias=c.bias)))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        t = idx.shape[1]
        pos = torch.arange(t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def tiny_gpt_config() -> GPTConfig:
    """A GPT of the same shape at a size a CPU test trains in seconds."""
    return GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)
