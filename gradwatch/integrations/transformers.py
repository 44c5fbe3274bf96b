"""gradwatch for the Hugging Face ``Trainer``: ``Trainer(..., callbacks=[GradWatchCallback()])``.

Attaches when training begins and detaches when it ends. A step is an optimizer step
(``on_step_end``, after gradient accumulation). The Trainer's optimizer (accelerate's wrapper of
it) is handed to gradwatch, so update-to-weight ratios and ``learning_rate`` findings are
measured. When the Trainer reports to TensorBoard,
gradwatch writes a run of its own beside the Trainer's: ``args.logging_dir`` where that
argument exists (transformers 4), else ``<output_dir>/runs/gradwatch``, so that
``tensorboard --logdir <output_dir>/runs`` shows both. Under several processes only rank 0 prints
and writes (gradwatch's own rank handling).
"""

from __future__ import annotations

import os
from typing import Any, Optional

from transformers import TrainerCallback

from ..watch import GradWatch


class GradWatchCallback(TrainerCallback):
    """Watch the Trainer's model during ``train()``. Keyword arguments go to :class:`GradWatch`."""

    def __init__(self, **gradwatch_kwargs: Any) -> None:
        self.gradwatch_kwargs = gradwatch_kwargs
        self.watch: Optional[GradWatch] = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        options = dict(self.gradwatch_kwargs)
        report_to = args.report_to if isinstance(args.report_to, (list, tuple)) else [args.report_to]
        if "log_dir" not in options and "writer" not in options and "tensorboard" in report_to:
            options["log_dir"] = getattr(args, "logging_dir", None) or os.path.join(args.output_dir, "runs",
                                                                                   "gradwatch")
        options.setdefault("steps", "manual")
        if kwargs.get("optimizer") is not None:
            options.setdefault("optimizer", kwargs["optimizer"])
        self.watch = GradWatch(model, **options).attach()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.watch is not None:
            self.watch.step()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.watch is not None:
            self.watch.detach()
