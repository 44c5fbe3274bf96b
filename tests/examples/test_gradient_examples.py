"""The gradient-flow examples: fashion_mnist_gradients (on generated IDX files) and activation_gallery."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from examples import activation_gallery, fashion_mnist_gradients as fmg
from tests.examples.fakes import fake_idx_dataset


def fake_fashion_mnist(root: Path, n_train: int = 300, n_test: int = 100) -> Path:
    return fake_idx_dataset(root, "fashion-mnist", n_train, n_test)


def random_batch(seed: int = 0, n: int = 256):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 784, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


def test_user_written_activations_match_torch():
    x = torch.linspace(-30, 30, 601)
    expected = {"sigmoid": torch.sigmoid(x), "tanh": torch.tanh(x), "relu": F.relu(x),
                "leakyrelu": F.leaky_relu(x, 0.1), "elu": F.elu(x), "swish": F.silu(x)}
    for name, cls in fmg.ACTIVATIONS.items():
        torch.testing.assert_close(cls()(x), expected[name], msg=name)


def test_gradient_ratios_on_real_shaped_random_data():
    x, y = random_batch(seed=0)
    ratios = fmg.gradient_ratios(x, y, seed=0)
    assert set(ratios) == set(fmg.ACTIVATIONS)
    assert ratios["sigmoid"] < 1e-2, ratios
    for act in ("tanh", "relu", "leakyrelu", "elu", "swish"):
        assert 0.1 < ratios[act] < 10, (act, ratios)


def test_gradwatch_flags_sigmoid_only_and_agrees_with_torch():
    x, y = random_batch(seed=1)
    for act in fmg.ACTIVATIONS:
        g = fmg.gradient_pass(act, x, y, seed=1)
        kinds = {f.kind.value for f in g["watch"].findings}
        raised = {w.category.__name__ for w in g["warnings"]}
        if act == "sigmoid":
            assert kinds == {"vanishing"} and raised == {"VanishingGradientWarning"}, (kinds, raised)
            assert g["watch"].findings[0].layer == "fc1"
        else:
            assert not kinds and not raised, (act, kinds, raised)
        assert g["gradwatch_vs_torch_max_rel_diff"] < 1e-5


@pytest.mark.slow
def test_fashion_example_end_to_end_on_generated_idx_files(tmp_path):
    data = fake_fashion_mnist(tmp_path / "data")
    out = tmp_path / "out"
    payload = fmg.main(["--quick", "--data-dir", str(data), "--no-verify", "--no-download",
                        "--runs", str(tmp_path / "runs"), "--out", str(out), "--steps", "2", "--threads", "1"])
    results = json.loads((out / "results.json").read_text())
    assert results["activations"].keys() == set(fmg.ACTIVATIONS)
    assert results["setup"]["gradient_batch"] == 256 and results["setup"]["train_steps"] == 2
    for act, r in results["activations"].items():
        assert r["first_last_weight_grad_ratio"] > 0
        assert set(r["weight_grad_norm"]) == {"fc1", "fc2", "fc3", "fc4", "fc5"}
        assert 0 <= r["training"]["test_accuracy"] <= 1 and r["training"]["steps"] == 2
        assert ("VanishingGradientWarning" in r["warnings"]) == (act == "sigmoid"), (act, r["warnings"])
    assert results["activations"]["sigmoid"]["first_last_weight_grad_ratio"] < 1e-2
    png = out / "gradient_histograms.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "runs" / "fashion_mnist_gradients" / "sigmoid").is_dir()  # TensorBoard run
    assert payload["activations"]["relu"]["first_last_weight_grad_ratio"] == pytest.approx(
        results["activations"]["relu"]["first_last_weight_grad_ratio"])


def test_fashion_example_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="missing .*fashion-mnist"):
        fmg.main(["--quick", "--data-dir", str(tmp_path), "--no-download", "--runs", str(tmp_path / "runs")])


@pytest.mark.slow
def test_activation_gallery(tmp_path):
    out = tmp_path / "out"
    activation_gallery.main(["--quick", "--runs", str(tmp_path / "runs"), "--out", str(out)])
    for name in ("activation_functions.png", "activation_outputs.png"):
        assert (out / name).stat().st_size > 10_000, name
    acts = json.loads((out / "results.json").read_text())["activations"]
    assert len(acts) == 11
    for name in ("Sigmoid", "Tanh", "Hardtanh"):
        assert acts[name]["gradwatch"]["saturated_fraction"] is not None, name
    for name in ("ReLU", "LeakyReLU", "ELU", "SELU", "Swish (SiLU)", "Mish"):
        assert acts[name]["gradwatch"]["saturated_fraction"] is None, name
    relu = acts["ReLU"]
    assert relu["gradwatch"]["zero_fraction"] == pytest.approx(0.5, abs=0.05)
    assert relu["output"]["zero_fraction"] == pytest.approx(0.5, abs=0.01)
    assert relu["mean_slope"] == pytest.approx(0.5, abs=0.01)
    # Hardtanh clips a third of standard-normal inputs (|x| > 1): a true saturation finding
    assert "SaturationWarning" in acts["Hardtanh"]["warnings"]
    assert acts["Tanh"]["gradwatch"]["saturated_fraction"] < 0.25 and not acts["Tanh"]["findings"]
