"""`python -W error`: a finding is raised in the user's loop as its GradWatchWarning subclass,
and gradwatch keeps counting steps afterwards, in every step mode."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from gradwatch import DeadUnitsWarning, GradWatch
from tests import models


def dead_mlp() -> nn.Module:
    model = models.small_mlp()
    with torch.no_grad():
        model[2].bias.fill_(-100.0)  # the second ReLU never fires
    return model


def one_step(model: nn.Module, opt: torch.optim.Optimizer, watch: GradWatch, mode: str) -> None:
    x, y = models.batch()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    if mode == "manual":
        watch.step()


@pytest.mark.parametrize("mode", ["forward", "optimizer", "manual"])
def test_a_finding_raised_as_an_error_reaches_the_loop_and_counting_goes_on(mode):
    model = dead_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    raised = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with GradWatch(model, every=1, dead_window=1, quiet=True, steps=mode,
                       optimizer=opt if mode == "optimizer" else None) as watch:
            for _ in range(6):
                try:
                    one_step(model, opt, watch, mode)
                except DeadUnitsWarning as w:
                    raised.append(w)
    assert len(raised) == 1 and "3" in str(raised[0])  # raised once, naming the dead layer
    assert watch.steps >= 6  # steps still counted after the exception
    assert watch.report().step >= 4  # and still measured
    assert not any("internal error" in n for n in watch.report().notes)


@pytest.mark.parametrize("mode", ["forward", "optimizer", "manual"])
def test_a_finding_raised_as_an_error_is_already_in_findings_jsonl(mode, tmp_path):
    model = dead_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeadUnitsWarning)
        watch = GradWatch(model, every=1, dead_window=1, quiet=True, steps=mode, log_dir=tmp_path,
                          optimizer=opt if mode == "optimizer" else None).attach()
        try:
            with pytest.raises(DeadUnitsWarning):
                for _ in range(6):
                    one_step(model, opt, watch, mode)
            lines = [json.loads(line) for line in (tmp_path / "findings.jsonl").read_text().splitlines()]
        finally:
            watch.detach()
    assert [r["kind"] for r in lines if r.get("layer") == "3"] == ["dead_units"]
