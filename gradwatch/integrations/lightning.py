"""gradwatch for ``lightning.pytorch.Trainer``: ``Trainer(callbacks=[GradWatchCallback()])``.

Attaches when fitting starts and detaches when it ends (also on an exception). A step is an
optimizer step (``trainer.global_step``), so gradient accumulation counts as Lightning does.
The optimizer ``configure_optimizers`` returned is handed to gradwatch (when there is one), so
update-to-weight ratios and ``learning_rate`` findings are measured. When the trainer has a
``TensorBoardLogger``, gradwatch writes into the same run. Under a distributed strategy only rank 0
prints and writes (gradwatch's own rank handling).
"""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from ..watch import GradWatch


class GradWatchCallback(Callback):
    """Watch the LightningModule during ``fit``. Keyword arguments go to :class:`GradWatch`."""

    def __init__(self, **gradwatch_kwargs: Any) -> None:
        super().__init__()
        self.gradwatch_kwargs = gradwatch_kwargs
        self.watch: Optional[GradWatch] = None
        self._global_step = 0

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        kwargs = dict(self.gradwatch_kwargs)
        if "log_dir" not in kwargs and "writer" not in kwargs:
            tb = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
            if tb is not None and trainer.is_global_zero:
                kwargs["writer"] = tb.experiment
        kwargs.setdefault("steps", "manual")
        if "optimizer" not in kwargs and len(trainer.optimizers) == 1:  # several (a GAN's): which one is ambiguous
            kwargs["optimizer"] = trainer.optimizers[0]
        self._global_step = trainer.global_step
        self.watch = GradWatch(pl_module, **kwargs).attach()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # global_step moves once per optimizer step, i.e. after the last accumulated batch.
        if self.watch is not None and trainer.global_step != self._global_step:
            self._global_step = trainer.global_step
            self.watch.step()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._detach()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._detach()

    def _detach(self) -> None:
        if self.watch is not None:
            self.watch.detach()
