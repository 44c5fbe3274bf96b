"""Never silently blind: noticing training that gradwatch's hooks did not see, and saying why once.

One permanent hook after the gradient accumulation of one watched parameter counts backward
passes (a Python call per backward pass, nothing more). When the model trains but its
forwards never reach gradwatch (a compiled twin reused the graph without hooks, hooks
removed, training through a method other than ``forward`` without the optimizer), or
measured steps see gradients but no layer output, or none of the first
:data:`NO_GRADIENT_AFTER` measured steps sees a parameter gradient, gradwatch says so once,
with the fix.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..layers import Layer, display_name
from ..report import StepData
from .hooks import WeakHook, untraced

UNSEEN_AFTER = 3
"""Backward passes without any forward seen before gradwatch says it is blind."""
NO_GRADIENT_AFTER = 10
"""Measured steps with layer outputs, none of them with a parameter gradient, before gradwatch
says it sees no gradients (a warm-up of forwards without backward stays shorter than this)."""

COMPILE_FIX = ("torch.compile skips module hook guards by default: when the model, or another instance of its "
               "class (a plain twin, an EMA or teacher copy), was compiled before gradwatch attached, the cached "
               "graph runs without gradwatch's hooks. Attach GradWatch before compiling anything of that class, or "
               "set torch._dynamo.config.skip_nnmodule_hook_guards = False.")


def scripted(model: nn.Module, layers: List[Layer]) -> Tuple[List[Layer], Optional[str]]:
    """TorchScript modules inside ``model`` take no Python hooks: the layers outside them, and
    the note that names them (None when there are none)."""
    if isinstance(model, torch.jit.ScriptModule):
        return [], (f"gradwatch: {type(model).__name__} is TorchScript (torch.jit.script), which takes no hooks: none "
                    f"of its {len(layers)} layer(s) is measured and its forwards are not seen, only its parameters' "
                    f"gradients are; pass optimizer=opt, steps=\"optimizer\" to count steps. Watch the module "
                    f"before scripting it (or leave it eager) to measure its layers.")
    tops: List[str] = []
    modules = dict(model.named_modules())
    for name, m in modules.items():
        if isinstance(m, torch.jit.ScriptModule) and not any(name.startswith(t + ".") for t in tops):
            tops.append(name)
    if not tops:
        return layers, None
    inside = {id(m) for t in tops for m in modules[t].modules()}
    kept = [layer for layer in layers if id(layer.module) not in inside]
    names = ", ".join(display_name(t) for t in tops)
    return kept, (f"gradwatch: {names} of {type(model).__name__} is TorchScript (torch.jit.script), which takes no "
                  f"hooks: its {len(layers) - len(kept)} layer(s) are not measured, their parameters' gradients "
                  f"and the rest of the model are. Watch the module before scripting it (or leave it eager) to "
                  f"measure its layers.")


class BlindSpot:
    """Watches for training that gradwatch cannot see; ``say`` receives each explanation once."""

    def __init__(self, model: nn.Module, n_layers: int, say: Callable[[str], None],
                 layers_seen: Callable[[], int] = lambda: 0) -> None:
        self.model = model
        self.n_layers = n_layers
        self.say = say
        self.layers_seen = layers_seen  # layer outputs recorded so far (optimizer steps without a forward)
        self.forwards = 0  # root forwards seen (training mode or not)
        self.backwards = 0  # backward passes that wrote a watched parameter's gradient
        self.measured_without_grads = 0
        self.measured_with_grads = 0
        self._handle: Optional[RemovableHandle] = None
        self._said: List[str] = []

    def attach(self, first_param: Optional[nn.Parameter]) -> None:
        """Count the backward passes that write ``first_param``'s gradient (placed again when
        the parameters change)."""
        self.detach()
        if first_param is not None and hasattr(first_param, "register_post_accumulate_grad_hook"):
            self._handle = first_param.register_post_accumulate_grad_hook(untraced(WeakHook(self._trained)))

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def said(self, key: str) -> None:
        """What ``key`` would explain was said another way: not again."""
        self._said.append(key)

    def _once(self, key: str, text: str) -> None:
        if key not in self._said:
            self._said.append(key)
            self.say(text)

    def _trained(self, param: nn.Parameter) -> None:
        self.backwards += 1
        if self.backwards >= UNSEEN_AFTER and self.forwards == 0 and not self.layers_seen():
            self._once("unseen", (
                f"gradwatch: {type(self.model).__name__} trained ({self.backwards} backward passes) but none of its "
                f"forwards reached gradwatch's hooks, so no step was counted or measured. If the model is trained "
                f"through another method than forward (model.encode(x)), pass optimizer=opt, steps=\"optimizer\" "
                f"(or steps=\"manual\" and call watch.step()). Otherwise: {COMPILE_FIX} If the hooks were removed "
                f"(module._forward_hooks.clear()), re-attach the watch."))

    def check_step(self, data: Optional[StepData], compiled: bool) -> None:
        """After a measured step: gradients but no layer output means the layers were not seen."""
        if data is None:
            return
        st = data.stats
        if self.n_layers and not st.layers and st.params:
            cause, fix = ("compiled with torch.compile", COMPILE_FIX) if compiled else (
                "calling no watched module", "A model trained through another method than forward, or hooks "
                "removed by hand, hide the layers from gradwatch.")
            self._once("layers", f"gradwatch: a training step of {type(self.model).__name__} ran without any of its "
                                 f"{self.n_layers} watched layers being seen ({cause}): activation statistics, "
                                 f"saturation and dead units cannot be measured, only parameter gradients. {fix}")
        if st.params:
            self.measured_with_grads += 1
        elif st.layers:
            self.measured_without_grads += 1
            if self.measured_without_grads >= NO_GRADIENT_AFTER and not self.measured_with_grads:
                self._once("no_grad", (
                    f"gradwatch: none of the first {NO_GRADIENT_AFTER} measured steps of {type(self.model).__name__} "
                    f"had a parameter gradient that gradwatch could read: no backward followed their forwards, or "
                    f"the gradients were computed apart from the model's parameters (torch.func, functional_call) "
                    f"and put into .grad by hand. Only activations are measured; with optimizer=opt the gradients "
                    f"are read at optimizer.step()."))
