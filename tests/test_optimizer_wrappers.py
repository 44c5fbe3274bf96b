"""optimizer=: the wrappers users hold (accelerate, Lightning, the Hugging Face Trainer's) are
unwrapped to the optimizer that steps; anything else fails at construction, quoted."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradwatch import GradWatch
from tests import models


def _loop(model, opt, steps=4, accumulate=1):
    x, y = models.batch()
    for i in range(steps * accumulate):
        loss = nn.functional.cross_entropy(model(x), y) / accumulate
        loss.backward()
        if (i + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad()


def test_accelerates_optimizer_is_unwrapped_and_steps_after_accumulation():
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = models.small_mlp()
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.05))
    assert type(opt).__name__ == "AcceleratedOptimizer"
    x, y = models.batch()
    inner = []
    opt.optimizer.register_step_post_hook(lambda *a: inner.append(1))
    with GradWatch(model, optimizer=opt, steps="optimizer", every=1, quiet=True, strict=True) as watch:
        for _ in range(6):  # 3 optimizer steps of 2 micro-batches
            with accelerator.accumulate(model):
                accelerator.backward(nn.functional.cross_entropy(model(x), y))
                opt.step()  # the wrapper steps the SGD only once gradients are synchronised
                opt.zero_grad()
    assert len(inner) == 3 and watch.steps in (3, 4)  # a step per real step (and step 0 opened on entry)
    ratio = watch.report().params["0.weight"].update_ratio
    assert ratio is not None and 1e-4 < ratio < 1


def test_lightnings_optimizer_is_unwrapped_inside_a_real_trainer(tmp_path):
    lightning = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.core.optimizer import LightningOptimizer

    class Manual(lightning.LightningModule):
        """Manual optimization: the module holds self.optimizers(), a LightningOptimizer."""

        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.net = models.small_mlp(width=16)
            self.watch = None

        def on_train_start(self):
            assert isinstance(self.optimizers(), LightningOptimizer)
            self.watch = GradWatch(self, optimizer=self.optimizers(), steps="optimizer", every=1, quiet=True,
                                   strict=True).attach()

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

        def on_train_end(self):
            self.watch.detach()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x, y = models.batch(n=64)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    module = Manual()
    trainer = lightning.Trainer(max_steps=4, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                                enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=tmp_path)
    trainer.fit(module, data)
    params = module.watch.report().params
    assert params["net.0.weight"].update_ratio is not None and params["net.0.weight"].learning_rate == 0.1


@pytest.mark.parametrize("bad, said", [
    (lambda opt, model: torch.optim.lr_scheduler.StepLR(opt, 1), "StepLR"),
    (lambda opt, model: model, "Sequential"),
    (lambda opt, model: [opt], "list"),
    (lambda opt, model: "adam", "'adam'"),
])
def test_something_that_is_not_an_optimizer_fails_at_construction_quoted(bad, said):
    model = models.small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=f"optimizer must be a torch.optim.Optimizer or a wrapper of one.*{said}"):
        GradWatch(model, optimizer=bad(opt, model))


def test_an_optimizer_subclass_without_hook_tables_is_refused_with_the_way_out():
    class Half(torch.optim.SGD):
        def __init__(self):  # never calls Optimizer.__init__, wraps nothing
            pass

    with pytest.raises(TypeError, match="never ran Optimizer.__init__.*pass the optimizer it steps"):
        GradWatch(models.small_mlp(), optimizer=Half())


def test_a_step_given_a_closure_reads_no_stale_gradient_before_it():
    """Lightning's automatic optimization and L-BFGS compute the gradients inside step(closure): what
    .grad holds before it is the previous step's, not what the step applies."""
    torch.manual_seed(0)
    model = models.small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = models.batch()

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with GradWatch(model, optimizer=opt, steps="optimizer", every=1, quiet=True, strict=True) as watch:
        _loop(model, opt, steps=1)  # a plain step: the gradient applied is read at step()
        plain = watch.report().params["0.weight"]
        opt.step(closure)
        opt.step(closure=closure)
        closed = watch.report().params["0.weight"]
    assert plain.applied_grad_norm == pytest.approx(plain.grad_norm)
    assert closed.applied_grad_norm is None and closed.grad_norm > 0
