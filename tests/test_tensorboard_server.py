"""A gradwatch run served by the real TensorBoard server, read through its HTTP data endpoints."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import torch

from gradwatch import DeadUnitsWarning, GradWatch
from tests import models


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(base: str, path: str, **params):
    url = base + path + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.slow
@pytest.mark.parametrize("load_fast", ["false", "true"])  # TensorBoard's Python reader, and its Rust data server
def test_tensorboard_serves_our_scalars_histograms_and_layout(tmp_path, load_fast):
    run = tmp_path / "relu"
    model = models.small_mlp()
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # layer 1 dead
        model[2].bias.fill_(-100.0)  # layer 3 dead
    with pytest.warns(DeadUnitsWarning):
        with GradWatch(model, log_dir=run, every=1, histogram_every=1, dead_window=2, quiet=True) as watch:
            models.train(model, 3)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path), "--host", "127.0.0.1",
         "--port", str(port), "--load_fast", load_fast, "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        tags = {}
        while time.time() < deadline:
            try:
                tags = get(base, "/data/plugin/scalars/tags")
                if tags.get("relu", {}).get("activation.dead_fraction/3"):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert "gradient.norm/0.weight" in tags["relu"] and "activation.dead_fraction/3" in tags["relu"]
        series = get(base, "/data/plugin/scalars/scalars", run="relu", tag="gradient.norm/0.weight")
        assert [point[1] for point in series] == [0, 1, 2]
        assert series[-1][2] == pytest.approx(watch.report().params["0.weight"].grad_norm, rel=1e-6)
        dead = get(base, "/data/plugin/scalars/scalars", run="relu", tag="activation.dead_fraction/3")
        assert dead[-1][2] == 1.0
        hists = get(base, "/data/plugin/histograms/tags")
        assert "activation/1" in hists["relu"] and "gradient/0.weight" in hists["relu"]
        for _, _, buckets in get(base, "/data/plugin/histograms/histograms", run="relu", tag="activation/3"):
            # A dead layer's zeros: buckets around 0, none running backwards, all 512 values in them.
            assert -0.5 <= buckets[0][0] < 0.0 < buckets[-1][1] <= 0.5
            assert all(left <= right for left, right, _ in buckets) and sum(c for _, _, c in buckets) == 512
        layout = get(base, "/data/plugin/custom_scalars/layout")
        assert {c["title"] for c in layout["category"]} == {"gradwatch: activations", "gradwatch: gradients",
                                                             "gradwatch: findings"}
        charts = [chart["title"] for c in layout["category"] for chart in c["chart"]]
        assert len(charts) == len(set(charts)) and "gradient.ratio" in charts
        # Both findings of their step in the one text of that step.
        texts = get(base, "/data/plugin/text/text", run="relu", tag="gradwatch/findings/text_summary")
        assert [t["step"] for t in texts] == sorted({f.step for f in watch.findings})
        assert "<code>1</code>" in texts[0]["text"] and "<code>3</code>" in texts[0]["text"]
        images = get(base, "/data/plugin/images/images", run="relu", tag="gradient.flow")
        assert images and images[0]["step"] == 0
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
