"""The Lightning callback, against the real lightning.pytorch.Trainer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

lightning = pytest.importorskip("lightning.pytorch")

from gradwatch import DeadUnitsWarning, LearningRateWarning  # noqa: E402
from gradwatch.integrations.lightning import GradWatchCallback  # noqa: E402
from tests import models  # noqa: E402


class Module(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = models.small_mlp(width=16)
        with torch.no_grad():
            self.net[2].bias.fill_(-100.0)  # the second hidden layer is dead from the start
        self.val_forwards = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        self.val_forwards += 1
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
def test_callback_counts_optimizer_steps_and_writes_into_the_trainers_tensorboard_run(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing import event_accumulator

    x, y = models.batch(n=96)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:16], y[:16]), batch_size=8)
    callback = GradWatchCallback(every=1, dead_window=2, quiet=True)
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = lightning.Trainer(max_steps=5, accumulate_grad_batches=2, logger=logger, callbacks=[callback],
                                enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                                val_check_interval=4, accelerator="cpu", devices=1)
    module = Module()
    with pytest.warns(DeadUnitsWarning):
        trainer.fit(module, data, val)
    watch = callback.watch
    assert trainer.global_step == 5 and watch.steps == 5  # one per optimizer step
    # One step = two accumulated training batches of 8; validation forwards (eval mode) are not counted.
    layer = watch.report().layers["net.3"]
    assert module.val_forwards > 0 and layer.calls == 2 and layer.count == 2 * 8 * 16
    assert not any(m._forward_hooks for m in module.modules())  # detached after fit
    acc = event_accumulator.EventAccumulator(logger.log_dir)
    acc.Reload()
    assert "activation.dead_fraction/net.3" in acc.Tags()["scalars"]


class Healthy(lightning.LightningModule):
    def __init__(self, lr):
        super().__init__()
        torch.manual_seed(0)
        self.net = models.small_mlp(width=16)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _fit(lr, tmp_path, steps=12):
    x, y = models.batch(n=128)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    callback = GradWatchCallback(every=1, quiet=True)
    trainer = lightning.Trainer(max_steps=steps, logger=False, callbacks=[callback], enable_progress_bar=False,
                                enable_checkpointing=False, enable_model_summary=False, accelerator="cpu", devices=1,
                                default_root_dir=tmp_path)
    trainer.fit(Healthy(lr), data)
    return callback.watch


@pytest.mark.slow
def test_the_trainers_optimizer_gives_update_ratios_and_names_a_learning_rate_100x_too_high(tmp_path):
    watch = _fit(0.1, tmp_path)
    assert not watch.findings
    params = watch.report().params
    assert set(params) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "net.4.weight", "net.4.bias"}
    assert all(p.update_ratio is not None and p.learning_rate == 0.1 for p in params.values())
    assert 1e-4 < params["net.2.weight"].update_ratio < 0.1
    with pytest.warns(LearningRateWarning):
        watch = _fit(10.0, tmp_path)
    found = [f for f in watch.findings if f.kind.value == "learning_rate"]
    assert found and "learning rate 10" in found[0].advice
