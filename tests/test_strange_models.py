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
from gradwatch.sinks.base import Sink
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
    assert rep.layers["lstm"].count == 4 * 5 * 16  # the output sequence, not h_n and c_n beside it
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

    monkeypatch.setattr(stats, "sample_rows_host", broken)  # a statistic of every layer's output
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


# ---------------------------------------------------------------- odd but legal models and loops
class Steps(Sink):
    """Every measured step's stats, by step."""

    def __init__(self) -> None:
        self.steps: dict = {}
        self.notes: list = []

    def on_step(self, data, new_findings) -> None:
        self.steps[data.stats.step] = data.stats

    def on_note(self, text: str) -> None:
        self.notes.append(text)


def recorded(watch: GradWatch) -> Steps:
    rec = Steps()
    watch.sinks.sinks.append(rec)
    return rec


def grad_norms(model: nn.Module) -> dict:
    """The hand computation: each parameter's gradient norm now, named as the model names it now."""
    return {n: torch.linalg.vector_norm(p.grad.double()).item() for n, p in model.named_parameters()
            if p.grad is not None and p.requires_grad}


def check_norms(st, expected: dict) -> None:
    assert set(st.params) == set(expected)
    for name, value in expected.items():
        assert st.params[name].grad_norm == pytest.approx(value, rel=1e-6), name


def one_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> dict:
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    expected = grad_norms(model)
    opt.step()
    return expected


@pytest.mark.parametrize("make, x", [
    (lambda: nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.LazyLinear(3)), torch.randn(32, 8)),
    (lambda: nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)), torch.randn(8, 1, 6, 6)),
], ids=["LazyLinear", "LazyConv2d"])
def test_lazy_modules_are_watched_from_their_first_forward(make, x):
    torch.manual_seed(0)
    model = make()
    y = torch.arange(len(x)) % 3
    with GradWatch(model, every=1, quiet=True, strict=True) as watch:  # before the first forward
        rec = recorded(watch)
        model(x)  # materialises the parameters in place (a step without backward)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        expected = [one_step(model, opt, x, y) for _ in range(2)]
    assert watch.steps == 3
    names = {"0.weight", "0.bias", f"{len(model) - 1}.weight", f"{len(model) - 1}.bias"}
    for step in (1, 2):
        assert set(expected[step - 1]) == names
        check_norms(rec.steps[step], expected[step - 1])
    assert rec.steps[0].params == {} and rec.steps[0].layers["1"].count == rec.steps[1].layers["1"].count > 0


def test_a_lazy_models_non_finite_gradient_is_named_at_its_unmeasured_step():
    """The per-step finiteness check of a gradient near the input is placed once the lazy
    parameters exist: the NaN at step 12 (not measured by the default schedule) is named there."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(16), nn.Tanh(), nn.LazyLinear(3))
    x, y = models.batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradWatchWarning)
        with GradWatch(model, quiet=True) as watch:
            rec = recorded(watch)
            model(x)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            for step in range(1, 14):
                loss = nn.functional.cross_entropy(model(x), y) * (float("nan") if step == 12 else 1.0)
                opt.zero_grad()
                loss.backward()
                if step != 12:
                    opt.step()
    assert not watch.schedule.measures(11) and not watch.schedule.measures(12)
    # Step 12 became a measured step when its gradient near the input turned out NaN; 11 stayed unmeasured.
    assert 11 not in rec.steps
    assert rec.steps[12].params["0.bias"].nonfinite and rec.steps[12].params["0.weight"].nonfinite


def test_pruned_parameters_are_named_as_the_model_names_them_at_each_step():
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = models.small_mlp()
    x, y = models.batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradWatch(model, every=1, quiet=True, strict=True) as watch:
        rec = recorded(watch)
        expected = [one_step(model, opt, x, y)]
        prune.l1_unstructured(model[0], "weight", amount=0.5)  # weight_orig is the parameter now
        expected.append(one_step(model, opt, x, y))
        prune.remove(model[0], "weight")  # the same tensor, named weight again
        expected.append(one_step(model, opt, x, y))
    report = watch.report()
    assert "0.weight_orig" in expected[1] and "0.weight" not in expected[1] and "0.weight" in expected[2]
    for step in range(3):
        check_norms(rec.steps[step], expected[step])
    assert "0.weight_orig" not in report.params and report.params["0.weight"].grad_norm > 0


def test_parametrized_weights_are_measured_under_their_current_names():
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    class Symmetric(nn.Module):
        def forward(self, w):
            return w.triu() + w.triu(1).transpose(-1, -2)

    torch.manual_seed(0)
    model = models.small_mlp()
    parametrize.register_parametrization(model[2], "weight", Symmetric())  # before the watch
    x, y = models.batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradWatch(model, every=1, quiet=True, strict=True) as watch:
        rec = recorded(watch)
        expected = [one_step(model, opt, x, y)]
        weight_norm(model[0])  # during the watch: weight becomes original0 (g) and original1 (v)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        expected.append(one_step(model, opt, x, y))
    assert "2.parametrizations.weight.original" in expected[0]
    assert {"0.parametrizations.weight.original0", "0.parametrizations.weight.original1"} <= set(expected[1])
    for step in range(2):
        check_norms(rec.steps[step], expected[step])
    assert rec.steps[1].layers["1"].count == 32 * 16  # the activations are measured as before


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:.*quantize.*:UserWarning")
def test_a_dynamically_quantised_model_is_measured_where_it_can_be():
    torch.manual_seed(0)
    model = torch.ao.quantization.quantize_dynamic(models.small_mlp(), {nn.Linear}, dtype=torch.qint8)
    x, _ = models.batch()
    with GradWatch(model, every=1, quiet=True, strict=True, include_eval=True) as watch:
        with torch.no_grad():
            hidden = model[1](model[0](x))
            model(x)
            model(x)
    report = watch.report()
    assert watch.steps == 2 and report.params == {}  # packed weights are no parameters
    assert {"0", "1", "2", "3", "4"} <= set(report.layers) and not any("packed" in n for n in report.layers)
    assert report.layers["0"].count == 32 * 16 and report.layers["1"].mean == pytest.approx(hidden.mean().item())


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_a_scripted_model_is_said_once_and_its_gradients_are_measured():
    torch.manual_seed(0)
    model = torch.jit.script(models.small_mlp())
    x, y = models.batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(GradWatchWarning, match="is TorchScript") as record:
        with GradWatch(model, every=1, quiet=True, strict=True, optimizer=opt, steps="optimizer") as watch:
            rec = recorded(watch)
            expected = [one_step(model, opt, x, y) for _ in range(3)]
    assert len([r for r in record if issubclass(r.category, GradWatchWarning)]) == 1
    assert watch.steps == 3
    for step in range(3):
        check_norms(rec.steps[step], expected[step])
        assert rec.steps[step].layers == {}


def test_a_forward_on_the_meta_device_is_no_step():
    with torch.device("meta"):
        model = models.small_mlp()
    with GradWatch(model, every=1, quiet=True, strict=True) as watch:
        assert model(torch.empty(4, 8, device="meta")).shape == (4, 3)  # shapes only
        assert watch.steps == 0
        model.to_empty(device="cpu")
        torch.manual_seed(0)
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
        models.train(model, 2)
    assert watch.steps == 2 and watch.report().layers["0"].count == 32 * 16
    assert watch.report().params["0.weight"].grad_norm > 0


@pytest.mark.parametrize("with_optimizer", [True, False])
def test_functional_call_with_gradients_put_into_grad_by_hand(with_optimizer):
    from torch.func import functional_call

    torch.manual_seed(0)
    model = models.small_mlp()
    x, y = models.batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step() -> dict:
        copies = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
        nn.functional.cross_entropy(functional_call(model, copies, (x,)), y).backward()
        for n, p in model.named_parameters():
            p.grad = copies[n].grad  # assigned, not accumulated: no hook sees it until optimizer.step()
        expected = grad_norms(model)
        opt.step()
        return expected

    # A step opens inside functional_call, where named_parameters() gives the tensors passed in:
    # their gradients are read at the end of backward; with the optimizer, again at its step.
    with GradWatch(model, every=1, quiet=True, strict=True, optimizer=opt if with_optimizer else None) as watch:
        rec = recorded(watch)
        expected = [step() for _ in range(3)]
    assert watch.steps == 3
    for s in range(3):
        check_norms(rec.steps[s], expected[s])
        assert rec.steps[s].layers["1"].count == 32 * 16


def test_per_sample_gradients_under_vmap_are_not_measured_and_the_steps_around_them_are():
    """DP-SGD style: per-sample gradients with vmap(grad(functional_call)) between ordinary steps."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = models.small_mlp()
    x, y = models.batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss(params, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, params, (xi[None],)), yi[None])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GradWatch(model, every=1, quiet=True) as watch:
            rec = recorded(watch)
            expected = []
            for _ in range(3):
                expected.append(one_step(model, opt, x, y))
                params = {n: p.detach() for n, p in model.named_parameters()}
                per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
                for n, p in model.named_parameters():
                    p.grad = per_sample[n].clamp(-1, 1).mean(0)
                opt.step()
    ours = [str(w.message) for w in caught if issubclass(w.category, GradWatchWarning)]
    assert len(ours) == 1 and "torch.func transform" in ours[0] and not any("internal error" in m for m in ours)
    assert watch.steps == 3
    for s in range(3):
        check_norms(rec.steps[s], expected[s])
        assert all(rec.steps[s].layers[n].count == 32 * w for n, w in (("0", 16), ("1", 16), ("4", 3)))


def test_vmap_inside_the_forward_leaves_that_layer_unmeasured_and_said_once():
    from torch.func import vmap

    class PerRow(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.act, self.head = nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)

        def forward(self, x):
            return self.head(vmap(self.act)(self.lin(x)))  # the activation runs on batched tensors

    torch.manual_seed(0)
    model = PerRow()
    with pytest.warns(GradWatchWarning, match="torch.func transform") as record:
        with GradWatch(model, every=1, quiet=True) as watch:
            models.train(model, 3)
    assert len([r for r in record if issubclass(r.category, GradWatchWarning)]) == 1
    layers = watch.report().layers
    assert "act" not in layers and layers["lin"].count == layers["head"].count * 16 // 3 == 32 * 16
    assert watch.steps == 3


def test_models_trained_in_threads_are_each_watched():
    import threading

    torch.manual_seed(0)
    nets = [models.small_mlp() for _ in range(2)]
    watches = [GradWatch(m, every=1, quiet=True, strict=True) for m in nets]
    errors: list = []

    def train(model: nn.Module, watch: GradWatch) -> None:
        try:
            with watch:
                models.train(model, 4)
        except BaseException as exc:  # noqa: BLE001 -- seen by the test below
            errors.append(exc)

    threads = [threading.Thread(target=train, args=pair) for pair in zip(nets, watches)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and [w.steps for w in watches] == [4, 4]
    assert all(w.report().layers["1"].count == 32 * 16 and w.report().params["0.weight"].grad_norm > 0
               for w in watches)


# ---------------------------------------------------------------- every entry point against odd models
def _plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        model.zero_grad()
        loss.backward()
        torch.optim.SGD(model.parameters(), lr=0.01).step()  # made after the first forward (lazy modules)


def _with_no_grad_forwards(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        with torch.no_grad():
            model(x)  # a rollout
        _plain(model, x, y, 1)


def _functional(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    from torch.func import functional_call, grad, vmap

    def loss(params, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, params, (xi[None],)), yi[None])

    for _ in range(steps):
        _plain(model, x, y, 1)
        params = {n: p.detach() for n, p in model.named_parameters()}
        per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
        for n, p in model.named_parameters():
            p.grad = per_sample[n].mean(0)


def _pruned() -> nn.Module:
    from torch.nn.utils import prune

    model = models.small_mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    return model


def _weight_norm() -> nn.Module:
    from torch.nn.utils.parametrizations import weight_norm

    model = models.small_mlp()
    weight_norm(model[2])
    return model


class _ScriptedChild(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.scripted = torch.jit.script(nn.Sequential(nn.Linear(16, 16), nn.Tanh()))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.scripted(self.stem(x)))


ODD = {
    "lazy": (lambda: nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.LazyLinear(3)), _plain),
    "pruned": (_pruned, _plain),
    "weight_norm": (_weight_norm, _plain),
    "scripted child": (_ScriptedChild, _plain),
    "rollouts": (models.small_mlp, _with_no_grad_forwards),
    "vmap": (models.small_mlp, _functional),
}


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", list(ODD))
def test_every_entry_point_takes_odd_models(name, tmp_path, capsys):
    """GradWatch in a with block with a log folder, report() and its table, the CLI reading the
    folder back, and attach/step()/detach() in manual mode: no internal error (strict), the same
    training as without gradwatch, and what cannot be measured said at most once per kind."""
    import io
    import json

    from rich.console import Console

    from gradwatch.cli import main

    make, train = ODD[name]
    x, y = models.batch()

    def run(watched: str):
        torch.manual_seed(0)
        model = make()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", GradWatchWarning)
            if watched == "with":
                with GradWatch(model, log_dir=tmp_path / "run", every=1, quiet=True, strict=True) as watch:
                    train(model, x, y, 3)
            elif watched == "manual":
                watch = GradWatch(model, every=1, quiet=True, strict=True, steps="manual").attach()
                for _ in range(3):
                    train(model, x, y, 1)
                    watch.step()
                watch.detach()
                watch.detach()
            else:
                watch = None
                train(model, x, y, 3)
        said = [str(w.message) for w in caught if issubclass(w.category, GradWatchWarning)]
        assert len(said) == len(set(said)), said  # each said once
        return model, watch, said

    plain, _, _ = run("plain")
    for how in ("with", "manual"):
        model, watch, said = run(how)
        assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), model.parameters()))
        assert watch.steps == 3 and not any("internal error" in s for s in said)
        report = watch.report()
        console = Console(file=io.StringIO(), width=100)
        console.print(report)
        assert report.layers and report.params and "layer" in console.file.getvalue()
    capsys.readouterr()
    assert main(["report", str(tmp_path / "run"), "--json"]) == 0
    read_back = json.loads(capsys.readouterr().out)
    assert [row["layer"] for row in read_back["layers"]]


@pytest.mark.slow
def test_the_lightning_callback_with_a_pruned_layer_and_a_no_grad_target(tmp_path):
    lightning = pytest.importorskip("lightning.pytorch")
    from gradwatch.integrations.lightning import GradWatchCallback

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _pruned()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            with torch.no_grad():
                target = self(x.flip(0)).softmax(-1)  # the same network, autograd off: no step
            return nn.functional.cross_entropy(self(x), target)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x, _ = models.batch(n=64)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, 0]), batch_size=8)
    callback = GradWatchCallback(every=1, quiet=True, strict=True)
    trainer = lightning.Trainer(max_steps=4, logger=False, callbacks=[callback], enable_progress_bar=False,
                                enable_checkpointing=False, enable_model_summary=False, accelerator="cpu",
                                devices=1, default_root_dir=tmp_path)
    trainer.fit(Module(), data)
    watch = callback.watch
    assert trainer.global_step == 4 and watch.steps == 4
    report = watch.report()
    assert report.layers["net.1"].calls == 1 and "net.0.weight_orig" in report.params


@pytest.mark.slow
def test_the_transformers_callback_with_a_pruned_plain_module(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from gradwatch.integrations.transformers import GradWatchCallback

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _pruned()

        def forward(self, x, labels=None):
            logits = self.net(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    class Rows(torch.utils.data.Dataset):
        def __init__(self):
            self.x, self.y = models.batch(n=32)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"x": self.x[i], "labels": self.y[i]}

    torch.manual_seed(0)
    model = Plain()
    callback = GradWatchCallback(every=1, quiet=True, strict=True)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                                          gradient_accumulation_steps=2, report_to=[], use_cpu=True,
                                          save_strategy="no", disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[callback]).train()
    watch = callback.watch
    assert watch.steps == 3
    report = watch.report()
    assert report.layers["net.1"].calls == 2 and report.params["net.0.weight_orig"].grad_norm > 0


def test_multihead_attention_is_measured_by_its_output_not_its_weights():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.head = mha, nn.Linear(8, 3)

        def forward(self, x):
            out, weights = self.attn(x, x, x)  # need_weights=True: the averaged weights come back too
            return self.head(out[:, -1])

    x = torch.randn(4, 5, 8)
    with torch.no_grad():
        expected = mha(x, x, x)[0]  # before the one step's update
    watch = run(Net(), lambda: x, steps=1)
    layer = watch.report().layers["attn"]
    assert layer.count == expected.numel()
    assert layer.mean == pytest.approx(expected.mean().item(), rel=1e-4, abs=1e-6)
