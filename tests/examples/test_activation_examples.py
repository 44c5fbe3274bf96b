"""The MNIST and CIFAR-10 activation examples, end to end on tiny generated datasets in the real file formats.

The images are random noise: these tests check that the examples run, write
results.json, figures and TensorBoard files for every activation, not what they learn.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from examples import cifar10_activations, mnist_activations
from tests.examples.fakes import fake_idx_dataset

ACTIVATIONS = ["elu", "leakyrelu", "relu", "tanh", "sigmoid"]


def make_mnist(root: Path, n_train: int = 120, n_test: int = 40) -> Path:
    return fake_idx_dataset(root, "mnist", n_train, n_test)


def make_cifar(root: Path, per_batch: int = 40, n_test: int = 40) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]
    for name, n in names:
        batch = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist(), b"filenames": [b"x.png"] * n}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return root


def common_args(data: Path, runs: Path, steps: int) -> list:
    return ["--quick", "--data-dir", str(data), "--no-verify", "--no-download", "--runs", str(runs),
            "--steps", str(steps), "--threads", "1", "--device", "cpu"]


def check_outputs(runs: Path, example: str, figures: list) -> dict:
    out = runs / example
    results = json.loads((out / "results.json").read_text())  # strict JSON: no NaN
    assert sorted(results["activations"]) == sorted(ACTIVATIONS)
    for name in figures:
        png = out / name
        assert png.exists() and png.stat().st_size > 1000, name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for act in ACTIVATIONS:
        events = list((out / act).glob("events.out.tfevents.*"))
        assert events and all(e.stat().st_size > 0 for e in events), act
        assert isinstance(results["activations"][act]["findings"], list)
    return results


@pytest.mark.slow
def test_mnist_activations_end_to_end(tmp_path, recwarn):
    data = make_mnist(tmp_path / "data")
    runs = tmp_path / "runs"
    payload = mnist_activations.main(common_args(data, runs, 6) + ["--eval-every", "3"])
    results = check_outputs(runs, "mnist_activations", ["test_curves.png"])
    for act in ACTIVATIONS:
        r = results["activations"][act]
        assert r["steps"] == 6
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert r["published_test_accuracy"] == mnist_activations.PUBLISHED[act]
        assert r["curve"]["step"] == [0, 3, 6]
        assert r["wall_seconds"] >= 0 and r["train_seconds"] >= 0
        assert set(r["last_weight_grad_norm"]) == {"conv1", "conv2", "fc1", "fc2"}
    assert set(results["acceptance"]) >= {"all", "sigmoid_lowest"}
    assert payload["setup"]["batch_size"] == 50 and payload["setup"]["lr"] == 1e-4


@pytest.mark.slow
def test_cifar10_activations_end_to_end(tmp_path, recwarn):
    data = make_cifar(tmp_path / "data")
    runs = tmp_path / "runs"
    cifar10_activations.main(common_args(data, runs, 4))
    results = check_outputs(runs, "cifar10_activations", ["losses.png", "grad_norms.png"])
    for act in ACTIVATIONS:
        r = results["activations"][act]
        # a short run keeps every step (blocks of one); a long one keeps block means
        assert r["steps"] == 4 and r["cross_entropy"]["block"] == 1 == r["total_loss"]["block"]
        assert len(r["cross_entropy"]["mean"]) == 4 == len(r["total_loss"]["mean"])
        # the regulariser is part of the total loss and only of it
        assert all(t > c for c, t in zip(r["cross_entropy"]["mean"], r["total_loss"]["mean"]))
        assert r["weight_grad_norm"]["steps"] and len(r["weight_grad_norm"]["conv1"]) == len(
            r["weight_grad_norm"]["steps"])
    # the loss scalars went to the same TensorBoard folder as gradwatch's
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs / "cifar10_activations" / "relu"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/cross_entropy", "loss/total", "loss/weight_decay"} <= tags
    assert any(t.startswith("gradient.norm/") for t in tags)


def test_cifar_model_shapes_and_initial_loss():
    torch.manual_seed(0)
    model = cifar10_activations.init_tf_(cifar10_activations.build_net(torch.nn.ReLU))
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    crops = cifar10_activations.random_crop_flip(x, gen)
    assert crops.shape == (4, 3, 24, 24)
    z = cifar10_activations.standardize(crops)
    assert torch.allclose(z.mean(dim=(1, 2, 3)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(z.std(dim=(1, 2, 3), unbiased=False), torch.ones(4), atol=1e-4)
    assert model(z).shape == (4, 10)
    # the tutorial's initial total loss is ~4.68: ln10 plus ~2.37 of weight decay
    with torch.no_grad():
        wd = float(cifar10_activations.weight_decay(model))
    assert 2.2 < wd < 2.5
    # a crop is a window of the image, possibly mirrored
    one = x[:1]
    c = cifar10_activations.random_crop_flip(one, torch.Generator().manual_seed(3))[0]
    found = any(torch.equal(c, w) or torch.equal(c, w.flip(-1))
                for i in range(9) for j in range(9) for w in [one[0, :, i:i + 24, j:j + 24]])
    assert found
    assert torch.equal(cifar10_activations.center_crop(x), x[..., 4:28, 4:28])


def test_mnist_model_shapes():
    model = mnist_activations.init_tf_(mnist_activations.build_cnn(torch.nn.Sigmoid))
    with torch.no_grad():
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert math.isclose(float(model.fc1.bias.detach()[0]), 0.1, rel_tol=1e-6)
    assert float(model.conv1.weight.detach().abs().max()) <= 0.2 + 1e-6
