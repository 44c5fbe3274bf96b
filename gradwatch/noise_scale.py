"""The gradient noise scale B_simple = tr(Σ) / |G|² (McCandlish et al., 2018, *An Empirical Model
of Large-Batch Training*): G is the expected gradient, Σ the covariance of per-sample gradients.
Below it a batch's gradient is mostly noise and larger batches train in proportionally fewer
steps; far above it they waste samples.

A mean gradient over b samples has E|G_b|² = |G|² + tr(Σ)/b, so squared norms of two mean
gradients of one step, over b and B > b samples, give unbiased estimates (the paper's
appendix A.1)::

    |G|²  ≈ (B |G_B|² − b |G_b|²) / (B − b)
    tr(Σ) ≈ (|G_b|² − |G_B|²) / (1/b − 1/B)

A common factor on both gradients (a loss summed or averaged over micro-batches, a loss scale)
multiplies both estimates by its square and cancels in the ratio. One step's estimates are very
noisy -- |G|² is a small difference of large numbers when the batch is far below B_simple -- so,
as in the paper, each is averaged on its own (exponential moving averages over measured steps)
and B_simple is the ratio of the averages (:class:`NoiseScale`). Pure functions of host numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

from .report import StepStats

DECAY = 0.95
"""The moving averages' decay per measured step: about the last 20 estimates count (400 steps at
the default interval of 20). With it, ``benchmarks/noise_scale.py`` finds the value within 25 % of
the exact one after 100 measured steps at batches from 0.4 to 3 x B_simple; at 0.9 a simulation of
the same estimator scatters 1.3 to 2 x as far."""

FAR_BELOW = 10
"""The note says the batch is far below the noise scale at batch <= B_simple / FAR_BELOW: there,
by the paper's model, each doubling of the batch cuts the optimizer steps needed by 1.8 x or more
for at most 9 % more samples (see :func:`batch_note`)."""

SETTLED = 50
"""Estimates averaged before the note may be said. Where the batch is a tenth of B_simple one
step's estimate is off by more than B_simple itself, and 20 averaged ones can still be off by 3 x."""


def estimate(small_sq: float, small_batch: float, big_sq: float, big_batch: float) -> Tuple[float, float]:
    """Unbiased estimates of (|G|², tr(Σ)) from the squared norms of two mean gradients of one step,
    over ``small_batch`` and ``big_batch`` samples (``big_batch > small_batch``, same scale).

    >>> estimate(2.0, 8, 1.25, 32)  # |G_b|^2 = 1 + 8/b: |G|^2 = 1, tr(Sigma) = 8
    (1.0, 8.0)
    """
    if not big_batch > small_batch > 0:
        raise ValueError(f"need big_batch > small_batch > 0, got {small_batch!r} and {big_batch!r}")
    gradient_sq = (big_batch * big_sq - small_batch * small_sq) / (big_batch - small_batch)
    trace = (small_sq - big_sq) / (1.0 / small_batch - 1.0 / big_batch)
    return gradient_sq, trace


def observations(micro_sq: float, micro_batches: float, samples: float, accumulated_sq: float,
                 world: int = 1) -> Optional[Tuple[float, float, float, float]]:
    """One step's two batch sizes, as ``(|G_b|², b, |G_B|², B)`` for :func:`estimate`, or None
    where the step has one batch size only (one micro-batch in one process).

    ``micro_sq``: the sum, over the step's micro-batches in every process, of the squared norm of
    the gradient each brought (before it was added to ``.grad``); ``micro_batches``: how many;
    ``samples``: their samples, together; ``accumulated_sq``: the squared norm of ``.grad`` after
    the step's last backward pass (summed over a process's micro-batches, averaged over ``world``
    processes by DDP). Each micro-batch's gradient is a mean over its b = samples / micro_batches
    samples (times the user's loss scale), so the mean gradient over all B = samples is ``.grad``
    / k, k the micro-batches per process; the smaller batch's squared norm is averaged over every
    micro-batch.

    >>> observations(micro_sq=8.0, micro_batches=4, samples=64, accumulated_sq=16.0)  # 4 of 16 samples
    (2.0, 16.0, 1.0, 64.0)
    """
    if not (micro_batches > 0 and samples > 0 and world >= 1) or micro_batches % world:
        return None
    k = micro_batches / world
    small, big = samples / micro_batches, float(samples)
    if not big > small:
        return None
    return micro_sq / micro_batches, small, accumulated_sq / (k * k), big


@dataclass
class NoiseScale:
    """B_simple from moving averages of the per-step estimates of |G|² and tr(Σ), each its own.
    Both averages carry the same start-up bias (their weights sum to 1 - decay**n), which cancels
    in their ratio."""

    decay: float = DECAY
    gradient_sq: float = 0.0
    trace: float = 0.0
    steps: int = 0  # estimates averaged

    def add(self, gradient_sq: float, trace: float) -> None:
        if not (math.isfinite(gradient_sq) and math.isfinite(trace)):
            return  # a step with non-finite gradients says nothing about their noise
        d = self.decay
        self.gradient_sq = d * self.gradient_sq + (1 - d) * gradient_sq
        self.trace = d * self.trace + (1 - d) * trace
        self.steps += 1

    @property
    def value(self) -> Optional[float]:
        """B_simple, in the samples the batch sizes were counted in; None before the first estimate,
        or while the averages are not positive (the mean gradient is still lost in the noise)."""
        if not self.steps or self.gradient_sq <= 0 or self.trace < 0:
            return None
        return self.trace / self.gradient_sq


def batch_note(stats: StepStats) -> Optional[str]:
    """A note, not a warning: the batch is at most B_simple / :data:`FAR_BELOW`, on an average of at
    least :data:`SETTLED` estimates. In the paper's model the optimizer steps S and samples E a run
    needs at batch B are S_min (1 + B_noise / B) and E_min (1 + B / B_noise): at B = B_noise / r,
    doubling B divides S by (1 + r) / (1 + r / 2), 1.83 at r = 10, and multiplies E by
    (1 + 2 / r) / (1 + 1 / r), 1.09 at r = 10."""
    ns, batch = stats.noise_scale, stats.batch_size
    if ns is None or not batch or stats.noise_scale_steps < SETTLED or batch * FAR_BELOW > ns:
        return None
    return (f"gradwatch: the gradient noise scale is about {ns:,.0f} samples at step {stats.step} "
            f"(B_simple = tr(Σ)/|G|², averaged over {stats.noise_scale_steps} measured steps), {ns / batch:,.0f} x "
            f"the batch of {batch:,} samples per optimizer step: most of each step's gradient is noise. In "
            f"McCandlish et al.'s model of large-batch training, below B_simple/{FAR_BELOW} each doubling of the "
            f"batch, with the learning rate raised to match, cuts the optimizer steps needed by 1.8x or more for at "
            f"most 9% more samples: with the hardware for larger batches (more processes, larger micro-batches), "
            f"training would take far fewer steps for about the same compute.")
