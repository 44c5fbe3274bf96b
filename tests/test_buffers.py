"""Per-unit dead-unit counters (``gradwatch.collect.buffers.UnitHistory``), on both of their paths."""

from __future__ import annotations

import torch

from gradwatch.collect.buffers import UnitHistory


class Elsewhere(torch.Tensor):
    """A tensor subclass: the counters take PyTorch's path for it, as for a tensor on an accelerator."""


def fold(batches, wrap=lambda t: t):
    history = UnitHistory(window=3)
    return [(seen, flags.tolist()) for seen, flags in (history.update("relu", wrap(b)) for b in batches)]


def test_a_unit_is_dead_when_idle_over_the_whole_window_seen_so_far_on_both_paths():
    alive = [torch.tensor([True, False, False]), torch.tensor([False, False, True]),
             torch.tensor([False, False, False]), torch.tensor([False, False, False]),
             torch.tensor([True, False, False])]
    expected = [(1, [0.0, 1.0, 1.0]),  # one batch seen: idle in it is dead so far
                (2, [0.0, 1.0, 0.0]),  # unit 0 was active in the window, unit 2 now
                (3, [0.0, 1.0, 0.0]),
                (3, [1.0, 1.0, 0.0]),  # the window holds 3 batches: unit 0 idle in all of them
                (3, [0.0, 1.0, 1.0])]
    assert fold(alive) == expected
    assert fold(alive, lambda t: t.as_subclass(Elsewhere)) == expected


def test_counters_start_afresh_when_the_number_of_units_changes():
    history = UnitHistory(window=4)
    history.update("relu", torch.tensor([False, True]))
    seen, flags = history.update("relu", torch.tensor([False, True, True]))
    assert seen == 1 and flags.tolist() == [1.0, 0.0, 0.0]
