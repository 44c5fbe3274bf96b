"""Attention saturation of nn.MultiheadAttention: recomputed weights, per-head numbers, the finding."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from gradwatch import AttentionCollapseWarning, GradWatch
from gradwatch import stats
from gradwatch.collect.attention import attention_logits


# ---------------------------------------------------------------- the numbers
def test_attention_summary_against_hand_values():
    inf = math.inf
    logits = torch.tensor([[
        [[0.0, 0.0, 0.0, 0.0], [50.0, 0.0, 0.0, 0.0], [0.0, 0.0, -inf, -inf], [-inf, -inf, -inf, -inf]],  # head 0
        [[1.0, -inf, -inf, -inf], [math.log(3.0), 0.0, -inf, -inf], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]],
    ]])  # (batch 1, heads 2, queries 4, keys 4)
    q, ent, norm, normalisable, sat, max_logit = stats.attention_summary(logits).tolist()
    # head 0: uniform over 4 (entropy log 4), one-hot, uniform over 2 (log 2), a fully masked query (left out)
    assert q[0] == 3 and normalisable[0] == 3 and sat[0] == 1 and max_logit[0] == 50.0
    assert ent[0] == pytest.approx(math.log(4) + 0.0 + math.log(2), abs=1e-6)
    assert norm[0] == pytest.approx(1.0 + 0.0 + 1.0, abs=1e-6)
    # head 1: a query with one key (entropy 0, no choice: neither normalised nor saturated),
    # weights (3/4, 1/4) and two uniform queries
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert q[1] == 4 and normalisable[1] == 3 and sat[1] == 0 and max_logit[1] == 2.0
    assert ent[1] == pytest.approx(h + 2 * math.log(4), abs=1e-6)
    assert norm[1] == pytest.approx(h / math.log(2) + 2.0, abs=1e-6)


CASES = {
    "seq-first": dict(),
    "batch-first": dict(batch_first=True),
    "bool mask + padding": dict(attn_mask="bool", key_padding_mask=True),
    "float mask per head": dict(attn_mask="float3d"),
    "bias_kv + zero_attn": dict(add_bias_kv=True, add_zero_attn=True, key_padding_mask=True, attn_mask="bool"),
    "kdim": dict(kdim=6, vdim=5, batch_first=True),
    "unbatched": dict(unbatched=True),
    "sampled": dict(n=10, length=100),
}


@pytest.mark.parametrize("case", list(CASES))
def test_recomputed_weights_equal_the_modules_own(case):
    c = CASES[case]
    torch.manual_seed(0)
    e, h, n, length, s = 8, 2, c.get("n", 3), c.get("length", 5), 7
    mha = nn.MultiheadAttention(e, h, batch_first=c.get("batch_first", False), add_bias_kv=c.get("add_bias_kv", False),
                                add_zero_attn=c.get("add_zero_attn", False), kdim=c.get("kdim"), vdim=c.get("vdim"))
    q = torch.randn(length, n, e)
    k = torch.randn(s, n, c.get("kdim") or e)
    v = torch.randn(s, n, c.get("vdim") or e)
    mask = kpm = None
    if c.get("attn_mask") == "bool":
        mask = torch.rand(length, s) > 0.7
        mask[:, 0] = False  # every query keeps a key
    elif c.get("attn_mask") == "float3d":
        mask = torch.randn(n * h, length, s)
    if c.get("key_padding_mask"):
        kpm = torch.zeros(n, s, dtype=torch.bool)
        kpm[:, -2:] = True
    if c.get("batch_first"):
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if c.get("unbatched"):
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
    _, weights = mha(q, k, v, key_padding_mask=kpm, attn_mask=mask, need_weights=True, average_attn_weights=False)
    if c.get("unbatched"):
        weights = weights.unsqueeze(0)
    logits = attention_logits(mha, q, k, mask, kpm)
    sb, sq = -(-n // 4), -(-length // 64)
    expected = weights[::sb, :, ::sq]
    assert logits.shape == expected.shape
    torch.testing.assert_close(torch.softmax(logits, -1), expected, atol=1e-5, rtol=1e-4)


def test_causal_hint_without_a_mask_builds_the_causal_mask():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2)
    x = torch.randn(5, 2, 8)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    _, weights = mha(x, x, x, attn_mask=causal, need_weights=True, average_attn_weights=False)
    got = torch.softmax(attention_logits(mha, x, x, None, None, is_causal=True), -1)
    torch.testing.assert_close(got, weights, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- through GradWatch
class Tiny(nn.Module):
    def __init__(self, batch_first: bool = True, d: int = 32, heads: int = 4, vocab: int = 20) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, 64, dropout=0.1, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, x, mask=None, padding=None):
        h = self.emb(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.enc(h, mask=mask, src_key_padding_mask=padding)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h)


def make(scale: float = 1.0, batch_first: bool = True) -> Tiny:
    torch.manual_seed(0)
    model = Tiny(batch_first)
    if scale != 1.0:  # queries and keys scaled up: one-hot attention
        with torch.no_grad():
            for layer in model.enc.layers:
                e = layer.self_attn.embed_dim
                layer.self_attn.in_proj_weight[:2 * e] *= scale
    return model


def train(model: Tiny, steps: int, watch: bool, *, causal: bool = False, padding: bool = False):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 20, (8, 24), generator=g)
    mask = nn.Transformer.generate_square_subsequent_mask(24) if causal else None
    pad = None
    if padding:
        pad = torch.zeros(8, 24, dtype=torch.bool)
        pad[::2, -5:] = True
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    outs, grads = [], []
    ctx = GradWatch(model, every=1, quiet=True, strict=True) if watch else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if ctx:
            ctx.attach()
        torch.manual_seed(5)  # dropout: gradwatch draws no random numbers
        try:
            for _ in range(steps):
                out = model(x, mask, pad)
                loss = nn.functional.cross_entropy(out.reshape(-1, 20), x.reshape(-1))
                opt.zero_grad()
                loss.backward()
                grads.append([p.grad.clone() for p in model.parameters()])
                opt.step()
                outs.append(out.detach().clone())
        finally:
            if ctx:
                ctx.detach()
    return ctx, outs, grads, [w for w in caught if issubclass(w.category, AttentionCollapseWarning)]


def test_healthy_transformer_is_silent_with_numbers_in_the_report():
    watch, _, _, caught = train(make(), 4, True)
    assert not caught and not watch.findings
    layers = watch.report().to_dict()["layers"]
    for name in ("enc.layers.0.self_attn", "enc.layers.1.self_attn"):
        ls = layers[name]
        assert 0.9 < ls["attention_entropy_normalised"] <= 1.0  # near uniform at initialisation
        assert ls["attention_entropy"] == pytest.approx(ls["attention_entropy_normalised"] * math.log(24), rel=0.02)
        assert ls["attention_saturated_fraction"] == 0.0 and 0 < ls["attention_max_logit"] < 10
        assert len(ls["attention_heads"]) == 4
    from gradwatch.render import to_text

    assert "attn H" in to_text(watch.report().table(full=True), width=200)


def test_scaled_queries_and_keys_are_named_with_their_heads():
    watch, _, _, caught = train(make(scale=16.0), 3, True)
    found = [f for f in watch.findings if f.kind.value == "attention_collapse"]
    assert caught and found
    f = found[0]
    assert f.layer.startswith("enc.layers.") and f.layer.endswith(".self_attn") and f.value > f.threshold == 0.5
    assert "heads " in f.message and "QK-norm" in f.advice and "warm-up" in f.advice
    ls = watch.report().layers[f.layer]
    assert ls.attention_entropy_normalised < 0.2 and ls.attention_max_logit > 50


@pytest.mark.parametrize("batch_first, causal, padding", [(True, False, False), (False, True, True)])
def test_outputs_and_gradients_are_bit_identical_and_hooks_go(batch_first, causal, padding):
    plain = make(8.0, batch_first)
    seen = copy.deepcopy(plain)
    _, out_a, grad_a, _ = train(plain, 3, False, causal=causal, padding=padding)
    watch, out_b, grad_b, _ = train(seen, 3, True, causal=causal, padding=padding)
    assert all(torch.equal(a, b) for a, b in zip(out_a, out_b))
    assert all(torch.equal(a, b) for ga, gb in zip(grad_a, grad_b) for a, b in zip(ga, gb))
    assert watch.report().layers["enc.layers.0.self_attn"].attention_entropy is not None
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in seen.modules())


def test_causal_queries_with_one_key_are_not_saturated():
    watch, _, _, _ = train(make(), 2, True, causal=True)
    assert watch.report().layers["enc.layers.0.self_attn"].attention_saturated_fraction == 0.0


def test_tensorboard_scalars_and_head_histogram(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = make()
    with GradWatch(model, log_dir=tmp_path, every=1, quiet=True):
        train(model, 2, False)
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    for tag in ("entropy", "entropy_normalised", "saturated_fraction", "max_logit"):
        assert f"attention.{tag}/enc.layers.1.self_attn" in acc.Tags()["scalars"]
    hist = acc.Histograms("attention.head_entropy/enc.layers.0.self_attn")
    assert hist[0].histogram_value.num == 4  # one value per head


def test_bf16_autocast_and_a_bf16_model_are_recomputed_in_float32():
    base = make(scale=4.0)
    with GradWatch(base, every=1, quiet=True, strict=True) as watch:
        train(base, 1, False)
    ref = watch.report().layers["enc.layers.0.self_attn"]
    for how in ("autocast", "bf16 model"):
        model = make(scale=4.0)
        if how == "bf16 model":
            model = model.to(torch.bfloat16)
        x = torch.randint(0, 20, (8, 24), generator=torch.Generator().manual_seed(1))
        with GradWatch(model, every=1, quiet=True, strict=True) as watch:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "autocast"):
                model(x).float().mean().backward()
        got = watch.report().layers["enc.layers.0.self_attn"]
        # the inputs differ only by the model's own bf16 rounding; the softmax itself is float32
        assert got.attention_entropy_normalised == pytest.approx(ref.attention_entropy_normalised, abs=0.05), how
