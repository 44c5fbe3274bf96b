"""benchmarks/gpu_models.py runs end to end at tiny sizes on the CPU (its figures come from a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from benchmarks.gpu_models import GPT, VARIANTS, GPTConfig, ResNet, tiny_gpt_config


def test_the_full_size_models_have_the_sizes_they_are_named_after():
    with torch.device("meta"):  # no memory, no initialisation
        gpt, resnet = GPT(GPTConfig()), ResNet()
    # GPT-2 small: 124M with its 50257-token vocabulary; nanoGPT pads it to 50304 (+36k)
    assert sum(p.numel() for p in gpt.parameters()) == pytest.approx(124.4e6, rel=0.005)
    assert sum(p.numel() for p in resnet.parameters()) == pytest.approx(25.56e6, rel=0.005)  # ResNet-50
    assert gpt.lm_head.weight is gpt.transformer.wte.weight  # tied


def test_the_tiny_gpt_trains():
    torch.manual_seed(0)
    model = GPT(tiny_gpt_config())
    x = torch.randint(0, 64, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        _, loss = model(x, torch.roll(x, -1, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_the_benchmark_runs_tiny_on_the_cpu():
    cmd = [sys.executable, "benchmarks/gpu_models.py", "--tiny", "--device", "cpu", "--backend", "eager",
           "--warmup", "2", "--rounds", "1", "--block", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=os.getcwd())
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for model in ("ResNet-50-style CNN (tiny", "GPT-2-small-style transformer (tiny"):
        section = text.split(model, 1)[1].split("\n\n", 1)[0]
        for variant in VARIANTS:  # each variant timed beside its baseline; no memory or syncs on the CPU
            line = next(line for line in section.splitlines() if line.startswith(f"  {variant:26s} "))
            ms, ratio, spread, syncs, memory, interval = line[28:].split()
            assert float(ms) > 0 and float(ratio.rstrip("x")) > 0 and syncs == memory == "-"
            assert interval == ("-" if VARIANTS[variant][0] is None else "1" if "every" in variant else "20")
