"""Attention through F.scaled_dot_product_attention: recomputed logits, rows named by the calling
module, the collapse finding, and what unmeasured steps and compiled models see of it."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from gradwatch import AttentionCollapseWarning, GradWatch
from gradwatch.collect.functional import FunctionalTap
from gradwatch.collect.sdpa import PROBE_FORWARDS, sdpa_logits


# ---------------------------------------------------------------- the numbers
def reference_weights(q, k, mask=None, causal=False, scale=None, gqa=False):
    """The attention weights SDPA computes, written out as its documentation does."""
    length, keys = q.shape[-2], k.shape[-2]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    bias = torch.zeros(length, keys)
    if causal:
        bias.masked_fill_(~torch.ones(length, keys, dtype=torch.bool).tril(0), -math.inf)
    if mask is not None:
        bias = bias.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else bias + mask
    if gqa:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
    return torch.softmax(q @ k.transpose(-2, -1) * scale + bias, dim=-1)


def _inputs(shape_q, shape_k, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(*shape_q, generator=g), torch.randn(*shape_k, generator=g)
    v = torch.randn(*shape_k[:-1], 5, generator=g)
    return q, k, v


def _mask(kind, shape):
    g = torch.Generator().manual_seed(1)
    if kind == "bool":
        m = torch.rand(*shape, generator=g) > 0.4
        m[..., 0] = True  # every query keeps a key
        return m
    if kind == "float":
        return torch.randn(*shape, generator=g)
    if kind == "finfo-min":  # Hugging Face's additive masks: a padded batch, causal
        length, keys = shape[-2:]
        m = torch.zeros(*shape)
        m.masked_fill_(~torch.ones(length, keys, dtype=torch.bool).tril(0), torch.finfo(torch.float32).min)
        m[0, ..., -2:] = torch.finfo(torch.float32).min  # the first sequence's last two keys are padding
        m[0, ..., 0] = 0.0
        return m
    raise ValueError(kind)


CASES = {
    "plain": dict(q=(3, 2, 6, 8), k=(3, 2, 6, 8)),
    "causal": dict(q=(3, 2, 6, 8), k=(3, 2, 6, 8), causal=True),
    "causal, more keys than queries": dict(q=(2, 2, 4, 8), k=(2, 2, 7, 8), causal=True),
    "bool mask per head": dict(q=(3, 2, 6, 8), k=(3, 2, 7, 8), mask=("bool", (3, 2, 6, 7))),
    "bool mask (L, S)": dict(q=(3, 2, 6, 8), k=(3, 2, 7, 8), mask=("bool", (6, 7))),
    "additive mask": dict(q=(3, 2, 6, 8), k=(3, 2, 7, 8), mask=("float", (3, 1, 6, 7))),
    "finfo.min mask": dict(q=(3, 2, 6, 8), k=(3, 2, 6, 8), mask=("finfo-min", (3, 1, 6, 6))),
    "scale": dict(q=(3, 2, 6, 8), k=(3, 2, 6, 8), scale=0.7),
    "grouped-query": dict(q=(3, 4, 6, 8), k=(3, 2, 6, 8), gqa=True, causal=True),
    "one key head broadcast": dict(q=(3, 4, 6, 8), k=(3, 1, 6, 8)),
    "3-D": dict(q=(3, 6, 8), k=(3, 7, 8), mask=("bool", (3, 6, 7))),
    "two batch dimensions": dict(q=(2, 3, 2, 6, 8), k=(2, 3, 2, 6, 8), causal=True),
    "sampled": dict(q=(10, 2, 100, 8), k=(10, 2, 100, 8), causal=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_recomputed_logits_give_sdpas_own_weights(case):
    c = CASES[case]
    q, k, v = _inputs(c["q"], c["k"])
    mask = _mask(*c["mask"]) if "mask" in c else None
    causal, scale, gqa = c.get("causal", False), c.get("scale"), c.get("gqa", False)
    weights = reference_weights(q, k, mask, causal, scale, gqa)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)
    vv = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3) if q.dim() > 3 and q.shape[-3] != v.shape[-3] else v
    torch.testing.assert_close(weights @ vv, out, atol=1e-5, rtol=1e-4)  # the reference is SDPA's
    logits = sdpa_logits(q, k, mask, causal, scale)
    # the sample: the leading dimensions flattened, at most 4 sequences and 64 queries, evenly strided
    flat = weights.reshape(-1, *weights.shape[-3:]) if weights.dim() > 3 else weights.unsqueeze(-3)
    sb, sq = -(-flat.shape[0] // 4), -(-flat.shape[-2] // 64)
    expected = flat[::sb, :, ::sq]
    assert logits.shape == expected.shape and logits.dtype == torch.float32
    torch.testing.assert_close(torch.softmax(logits, -1), expected, atol=1e-5, rtol=1e-4)


def test_masked_keys_are_minus_infinity_so_a_causal_first_query_has_no_choice():
    q, k, _ = _inputs((1, 1, 4, 8), (1, 1, 4, 8))
    logits = sdpa_logits(q, k, _mask("finfo-min", (1, 1, 4, 4)), False)
    allowed = (logits > -math.inf).sum(-1)[0, 0].tolist()
    assert allowed == [1, 2, 2, 2]  # keys 0..i, less the two padded keys 2 and 3


def test_long_contexts_are_sampled_within_the_budget():
    q, k, _ = _inputs((4, 8, 512, 4), (4, 8, 512, 4))
    logits = sdpa_logits(q, k, None, True, budget=8 * 512 * 16)
    assert logits.numel() <= 8 * 512 * 16 and logits.shape[:2] == (1, 8) and logits.shape[-1] == 512


# ---------------------------------------------------------------- through GradWatch
class SelfAttention(nn.Module):
    """nanoGPT's CausalSelfAttention (optionally grouped-query, with a second, cross-attention call)."""

    def __init__(self, d=32, heads=4, kv_heads=4, dropout=0.1, cross=False):
        super().__init__()
        self.heads, self.kv_heads, self.dropout, self.cross = heads, kv_heads, dropout, cross
        hd = d // heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * kv_heads * hd)
        self.proj = nn.Linear(d, d)

    def split(self, x, heads):
        b, t, _ = x.shape
        return x.view(b, t, heads, -1).transpose(1, 2)

    def forward(self, x, memory=None):
        q = self.split(self.q(x), self.heads)
        k, v = (self.split(t, self.kv_heads) for t in self.kv(x).chunk(2, -1))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True,
                                           enable_gqa=self.kv_heads != self.heads)
        if self.cross and memory is not None:
            km, vm = (self.split(t, self.kv_heads) for t in self.kv(memory).chunk(2, -1))
            y = y + F.scaled_dot_product_attention(q, km, vm, dropout_p=p, enable_gqa=self.kv_heads != self.heads)
        return self.proj(y.transpose(1, 2).reshape(x.shape))


class Block(nn.Module):
    def __init__(self, d, **kw):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = SelfAttention(d, **kw)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, memory=None):
        x = x + self.attn(self.ln1(x), memory)
        return x + self.mlp(self.ln2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab=24, d=32, layers=2, length=16, **kw):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(length, d)
        self.h = nn.ModuleList([Block(d, **kw) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight  # tied, as nanoGPT

    def forward(self, idx, memory=None):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x, memory)
        return self.lm_head(self.ln_f(x))


def make(scale=1.0, layer=None, **kw):
    torch.manual_seed(0)
    model = NanoGPT(**kw)
    if scale != 1.0:
        with torch.no_grad():
            for i, block in enumerate(model.h):
                if layer is None or i == layer:
                    block.attn.q.weight.mul_(scale)
                    block.attn.kv.weight[: block.attn.kv.weight.shape[0] // 2].mul_(scale)
    return model


def train(model, steps, watch_kwargs=None, memory=False, compiled=False):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 24, (8, 16), generator=g)
    mem = torch.randn(8, 5, 32, generator=g) if memory else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run = torch.compile(model, backend="eager") if compiled else model
    watch = GradWatch(model, quiet=True, strict=True, **watch_kwargs) if watch_kwargs is not None else None
    outs, grads = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if watch:
            watch.attach()
        torch.manual_seed(5)  # the dropout masks: gradwatch draws no random number
        try:
            for _ in range(steps):
                out = run(x[:, :-1], mem)
                loss = F.cross_entropy(out.reshape(-1, 24), x[:, 1:].reshape(-1))
                opt.zero_grad()
                loss.backward()
                grads.append([p.grad.clone() for p in model.parameters()])
                opt.step()
                outs.append(out.detach().clone())
        finally:
            if watch:
                watch.detach()
    return watch, outs, grads, [w for w in caught if issubclass(w.category, AttentionCollapseWarning)]


def test_rows_are_named_by_the_calling_module_with_numbers_per_head():
    watch, _, _, caught = train(make(), 4, dict(every=1))
    assert not caught and not watch.findings
    layers = watch.report().layers
    rows = sorted(n for n, ls in layers.items() if ls.attention_entropy is not None)
    assert rows == ["h.0.attn", "h.1.attn"]
    for name in rows:
        ls = layers[name]
        assert ls.type == "SelfAttention" and ls.calls == 1 and len(ls.attention_heads) == 4
        assert 0.85 < ls.attention_entropy_normalised <= 1.0 and ls.attention_saturated_fraction == 0.0
        assert 0 < ls.attention_max_logit < 10


def test_a_second_call_in_one_forward_has_a_row_of_its_own_and_gqa_counts_query_heads():
    watch, _, _, _ = train(make(kv_heads=2, cross=True), 2, dict(every=1), memory=True)
    layers = watch.report().layers
    assert {"h.0.attn#1", "h.0.attn#2", "h.1.attn#1", "h.1.attn#2"} <= set(layers)
    assert all(len(layers[n].attention_heads) == 4 for n in ("h.0.attn#1", "h.0.attn#2"))
    # the cross-attention has no causal mask: none of its queries is limited to one key
    assert layers["h.0.attn#2"].attention_entropy_normalised > 0.85


def test_scaled_queries_and_keys_are_named_at_their_layer():
    watch, _, _, caught = train(make(scale=30.0, layer=1), 3, dict(every=1))
    found = [f for f in watch.findings if f.kind.value == "attention_collapse"]
    assert caught and [f.layer for f in found] == ["h.1.attn"]
    assert "heads " in found[0].message and found[0].value > 0.5
    layers = watch.report().layers
    assert layers["h.1.attn"].attention_max_logit > 50 and layers["h.0.attn"].attention_saturated_fraction < 0.1


def test_outputs_gradients_and_dropout_stream_are_unchanged_and_hooks_go():
    _, out_a, grad_a, _ = train(make(scale=4.0), 3, None)
    after_plain = torch.random.get_rng_state()
    model = make(scale=4.0)
    watch, out_b, grad_b, _ = train(model, 3, dict(every=1))
    assert torch.equal(after_plain, torch.random.get_rng_state())
    assert all(torch.equal(a, b) for a, b in zip(out_a, out_b))
    assert all(torch.equal(a, b) for ga, gb in zip(grad_a, grad_b) for a, b in zip(ga, gb))
    assert watch.report().layers["h.0.attn"].attention_entropy is not None
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert not _get_current_function_mode_stack()


class Spy(nn.Module):
    """Records, at each forward, whether a function mode is active and how many hooks its parent has."""

    def __init__(self, parent_hooks):
        super().__init__()
        self.parent_hooks = parent_hooks
        self.seen = []
        self.register_buffer("state", torch.zeros(1))  # not a candidate activation: gradwatch never probes it

    def forward(self, x):
        self.seen.append((len(_get_current_function_mode_stack()), self.parent_hooks()))
        return x


def test_unmeasured_steps_enter_no_tap_and_register_no_hook():
    model = make()
    spy = Spy(lambda: len(model.h[0].attn._forward_pre_hooks))
    model.h[0].attn.q = nn.Sequential(model.h[0].attn.q, spy)
    train(model, 8, dict(every=4))
    measured = [i for i, (modes, _) in enumerate(spy.seen) if modes]
    assert measured == [0, 4]
    assert all(hooks == 0 for modes, hooks in spy.seen if not modes)
    assert all(hooks == 1 for modes, hooks in spy.seen if modes)


class CountingMode(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)


TAPPED = {  # model, its input, the loss, a layer measured by a hook, one whose attention is measured
    "nanoGPT (SDPA)": (make, lambda: torch.randint(0, 24, (8, 15), generator=torch.Generator().manual_seed(1)),
                       lambda out, x: F.cross_entropy(out.reshape(-1, 24), x.reshape(-1)), "h.0.mlp.1", "h.0.attn"),
    "nn.MultiheadAttention": (_encoder, lambda: torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(1)),
                              lambda out, x: out.square().mean(), "layers.0.linear1", "layers.0.self_attn"),
}


@pytest.mark.parametrize("case", list(TAPPED))
def test_the_tap_sees_the_models_own_calls_only_not_gradwatchs_work_in_its_hooks(monkeypatch, case):
    # gradwatch's work on a measured output calls dozens of tensor functions per layer: run under the
    # tap, each would be a Python call of it (a measured step of an attention model several per cent slower).
    make_model, make_input, loss, layer, attention = TAPPED[case]
    model, x = make_model(), make_input()
    own = CountingMode()
    with own:
        model(x)
    seen = []
    original = FunctionalTap.__torch_function__

    def counted(self, func, types, args=(), kwargs=None):
        seen.append(func)
        return original(self, func, types, args, kwargs)

    monkeypatch.setattr(FunctionalTap, "__torch_function__", counted)
    with GradWatch(model, every=1, quiet=True, strict=True) as watch:
        for _ in range(2):
            seen.clear()
            loss(model(x), x).backward()
            assert len(seen) == own.calls
    assert watch.report().layers[attention].attention_entropy is not None
    assert watch.report().layers[layer].count > 0


def test_a_model_without_attention_stops_entering_the_tap():
    torch.manual_seed(0)
    spy = Spy(lambda: 0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), spy, nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradWatch(model, every=1, quiet=True, strict=True) as watch:
        for _ in range(6):
            F.cross_entropy(model(torch.randn(4, 8)), torch.arange(4) % 3).backward()
            opt.step()
    assert [modes for modes, _ in spy.seen] == [1] * PROBE_FORWARDS + [0] * (6 - PROBE_FORWARDS)
    assert watch.report().layers["0"].count == 4 * 16


def test_include_and_exclude_select_the_calling_modules():
    watch, _, _, _ = train(make(), 2, dict(every=1, exclude="h.1"))
    rows = [n for n, ls in watch.report().layers.items() if ls.attention_entropy is not None]
    assert rows == ["h.0.attn"]
    watch, _, _, _ = train(make(), 2, dict(every=1, include="h.1.attn"))
    rows = [n for n, ls in watch.report().layers.items() if ls.attention_entropy is not None]
    assert rows == ["h.1.attn"]


def test_multihead_attention_is_measured_once_by_its_own_hook():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
    with GradWatch(model, every=1, quiet=True, strict=True) as watch:
        model(torch.randn(2, 6, 16)).sum().backward()
    rows = {n: ls for n, ls in watch.report().layers.items() if ls.attention_entropy is not None}
    assert list(rows) == ["layers.0.self_attn"] and len(rows["layers.0.self_attn"].attention_heads) == 4


def test_checkpointed_recompute_is_not_counted_twice():
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(NanoGPT):
        def forward(self, idx, memory=None):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.h:
                x = checkpoint(block, x, use_reentrant=False)
            return self.lm_head(self.ln_f(x))

    torch.manual_seed(0)
    model = Checkpointed()
    with GradWatch(model, every=1, quiet=True, strict=True) as watch:
        model(torch.randint(0, 24, (2, 8))).sum().backward()
    assert [n for n, ls in watch.report().layers.items() if ls.attention_entropy is not None] == ["h.0.attn",
                                                                                                   "h.1.attn"]
    assert watch.report().layers["h.0.attn"].calls == 1


@pytest.mark.slow
def test_a_compiled_model_trains_unchanged_without_recompiles_and_without_misnamed_rows():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    _, out_plain, _, _ = train(make(), 6, None, compiled=True)
    torch._dynamo.reset()
    counters.clear()
    model = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # dynamo's notes about tracing gradwatch's hooks
        watch = GradWatch(model, every=3, quiet=True).attach()
        run = torch.compile(model, backend="eager")
        x = torch.randint(0, 24, (8, 16), generator=torch.Generator().manual_seed(1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        counts = []
        torch.manual_seed(5)
        outs = []
        for step in range(12):
            out = run(x[:, :-1])
            F.cross_entropy(out.reshape(-1, 24), x[:, 1:].reshape(-1)).backward()
            opt.step()
            opt.zero_grad()
            outs.append(out.detach())
            counts.append((counters["stats"].get("unique_graphs", 0), sum(counters["graph_break"].values())))
        watch.detach()
    assert counts[3] == counts[-1]  # after the first measured and unmeasured steps: no recompile, no break
    assert all(torch.equal(a, b) for a, b in zip(out_plain, outs))
    layers = watch.report().layers
    assert "(model)" not in layers and not any(ls.attention_entropy is not None for ls in layers.values())
