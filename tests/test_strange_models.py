"""Models that are not a stack of Linear+ReLU: gradwatch must measure what it can and never crash."""

from __future__ import annotations

import copy
import pickle
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from gradwatch import GradWatch, GradWatchWarning, NonFiniteWarning
from tests import models


def run(model: nn.Module, make_input, steps: int = 2, **kwargs) -> GradWatch:
    params = [p for p in model.parameters() if p.requires_grad]
    dense = [p for p in params if not getattr(p, "_sparse_grad", False)]
    opt = torch.optim.SGD(dense, lr=0.01) if dense else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradWatchWarning)
        with GradWatch(model, every=1, quiet=True, strict=True, **kwargs) as watch:
            for _ in range(steps):
                out = model(make_input())
                loss = loss_of(out)
                if opt:
                    opt.zero_grad()
                loss.backward()
                if opt:
                    opt.step()
    return watch


def loss_of(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.float().pow(2).mean()
    if isinstance(out, dict):
        return sum(loss_of(v) for v in out.values() if isinstance(v, torch.Tensor) and v.is_floating_point())
    if hasattr(out, "__dataclass_fields__"):
        return loss_of(out.logits)
    return loss_of(out[0])


def test_lstm_and_gru_with_nested_hidden_state_tuples():
    class Rnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(8, 16, batch_first=True)
            self.gru = nn.GRU(16, 16, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            h, (hn, cn) = self.lstm(x)
            h, _ = self.gru(h)
            return self.head(h[:, -1])

    watch = run(Rnn(), lambda: torch.randn(4, 5, 8))
    rep = watch.report()
    assert rep.layers["lstm"].count == 4 * 5 * 16 + 2 * 16 * 4  # output, h_n and c_n
    assert rep.params["lstm.weight_hh_l0"].grad_norm > 0


def test_transformer_encoder_and_multihead_attention():
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    watch = run(model, lambda: torch.randn(3, 6, 16))
    rep = watch.report()
    assert "layers.0.self_attn" in rep.layers  # returns (out, None)
    assert rep.layers["layers.1.linear2"].output_grad_norm > 0
    assert rep.params["layers.0.self_attn.in_proj_weight"].grad_norm > 0


@pytest.mark.parametrize("sparse", [False, True])
def test_embedding_with_integer_inputs_and_sparse_gradients(sparse):
    model = nn.Sequential(nn.Embedding(50, 8, sparse=sparse), nn.Flatten(), nn.Linear(32, 3))
    watch = run(model, lambda: torch.randint(0, 50, (4, 4)))
    emb = watch.report().params["0.weight"]
    assert emb.grad_norm > 0


def test_dict_and_dataclass_outputs():
    @dataclass
    class Out:
        logits: torch.Tensor
        extra: str = "x"

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 3)

        def forward(self, x):
            return Out(self.lin(x))

    watch = run(M(), lambda: torch.randn(4, 8), include=["*"])
    assert watch.report().layers["lin"].count == 12
    assert watch.report().layers["(model)"].count == 12  # the dataclass's tensor field
    assert watch.report().params["lin.weight"].grad_norm > 0  # found the end of backward through it


def test_empty_batch_and_integer_or_complex_outputs_do_not_crash():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 3)

        def forward(self, x):
            y = self.lin(x)
            return y, y.argmax(-1), torch.complex(y, y)

    watch = run(Odd(), lambda: torch.randn(4, 8), include=["*"])
    root = watch.report().layers["(model)"]
    assert root.count == 12  # the float output only
    assert root.note == "not measured: outputs of dtype complex64, int64"
    model = models.small_mlp()
    watch = run(model, lambda: torch.randn(0, 8))
    assert watch.report().layers["0"].count == 0


def test_forward_that_raises_halfway_leaves_state_consistent():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), models.NanAt(), nn.Linear(8, 3))

    def boom(module, args):
        if module.explode:
            raise RuntimeError("user bug")

    model[2].explode = False
    model[2].register_forward_pre_hook(boom)
    x, y = models.batch()
    with GradWatch(model, every=1, quiet=True, strict=True) as watch:
        models.train(model, 1)
        model[2].explode = True
        with pytest.raises(RuntimeError, match="user bug"):
            model(x)
        model[2].explode = False
        models.train(model, 1)
    assert watch.report().step == 2 and watch.report().layers["3"].count == 32 * 3


def test_fp16_activations_do_not_overflow_into_false_findings():
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3)).half()
    with torch.no_grad():
        model[0].weight.fill_(40.0)  # outputs around 300: their squares overflow fp16
    x = torch.ones(32, 8, dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWarning)
        with GradWatch(model, every=1, quiet=True, strict=True) as watch:
            model(x).float().sum().backward()
    layer = watch.report().layers["0"]
    assert layer.mean == pytest.approx(320.0, rel=0.01) and not layer.nonfinite


def test_bf16_autocast_on_cpu():
    model = models.small_mlp()
    x, y = models.batch()
    with GradWatch(model, every=1, quiet=True, strict=True) as watch:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
    assert watch.report().layers["0"].output_grad_norm > 0


def test_detach_restores_the_model_exactly():
    model = models.small_cnn()
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_attrs = {name: set(vars(m)) for name, m in model.named_modules()}
    with GradWatch(model, every=1, quiet=True):
        models.train(model, 1, torch.randn(4, 1, 12, 12), torch.randint(0, 3, (4,)), lr=0.0)
    assert {name: set(vars(m)) for name, m in model.named_modules()} == before_attrs
    assert all(torch.equal(before_state[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    pickle.loads(pickle.dumps(model))
    copy.deepcopy(model)


def test_an_error_inside_gradwatch_is_reported_once_and_training_continues(monkeypatch):
    from gradwatch import stats

    def broken(*args, **kwargs):
        raise ValueError("bug in gradwatch")

    monkeypatch.setattr(stats, "sample_row_host", broken)  # a statistic of every layer's output
    model = models.small_mlp()
    with pytest.warns(GradWatchWarning, match="internal error in 0.*bug in gradwatch") as record:
        with GradWatch(model, every=1, quiet=True):
            losses = models.train(model, 3)
    assert len([r for r in record if "internal error in 0" in str(r.message)]) == 1
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="bug in gradwatch"):
        with GradWatch(model, every=1, quiet=True, strict=True):
            models.train(model, 1)


def test_a_tensorboard_failure_mid_run_warns_once_and_training_continues(tmp_path):
    model = models.small_mlp()
    watch = GradWatch(model, log_dir=tmp_path, every=1, quiet=True)
    with pytest.warns(GradWatchWarning, match="TensorBoardSink failed.*disk full") as record:
        with watch:
            models.train(model, 2)
            tb = [s for s in watch.sinks if type(s).__name__ == "TensorBoardSink"][0]

            def full(*args, **kwargs):
                raise OSError(28, "disk full")

            tb.writer._get_file_writer().add_summary = full  # where a step's event is written
            models.train(model, 3)
    assert len([r for r in record if "TensorBoardSink" in str(r.message)]) == 1
    assert watch.steps == 5
