"""Reading gradwatch runs back from disk: TensorBoard event files (with TensorBoard's own
reader), ``findings.jsonl`` and ``gradwatch.json``. Used by the ``gradwatch`` command."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .sinks.jsonl import FINDINGS_FILE, FORMAT_VERSION, META_FILE

Series = List[Tuple[int, float]]


class RunError(ValueError):
    """A folder holds no gradwatch run, or one written by an incompatible version."""


@dataclass
class Run:
    """One run: per-layer and per-parameter scalar series, histograms, findings."""

    path: Path
    layers: List[str]  # forward order when gradwatch.json is there, else sorted
    layer_types: Dict[str, str]
    layer_scalars: Dict[str, Dict[str, Series]] = field(default_factory=dict)  # stat -> layer -> series
    param_scalars: Dict[str, Dict[str, Series]] = field(default_factory=dict)
    param_layer: Dict[str, str] = field(default_factory=dict)
    histograms: Dict[str, List[Tuple[int, List[float], List[float]]]] = field(default_factory=dict)
    findings: List[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    def series(self, stat: str, layer: str) -> Series:
        return self.layer_scalars.get(stat, {}).get(layer, [])

    def latest(self, stat: str, layer: str) -> Optional[float]:
        s = self.series(stat, layer)
        return s[-1][1] if s else None

    def worst(self, stat: str, layer: str) -> Optional[float]:
        values = [v for _, v in self.series(stat, layer) if math.isfinite(v)]
        return max(values) if values else None

    def weighted_layers(self) -> List[str]:
        """Layers with parameter gradients, in forward order."""
        with_grads = set(self.layer_scalars.get("gradient.layer_norm", {}))
        return [n for n in self.layers if n in with_grads]


def has_events(folder: Path) -> bool:
    return folder.is_dir() and any(p.name.startswith("events.out.tfevents") for p in folder.iterdir())


def find_runs(paths: List[str]) -> List[Path]:
    """Each argument is a run folder, or a parent whose sub-folders are runs (``runs/mnist``)."""
    out: List[Path] = []
    for arg in paths:
        p = Path(arg)
        if not p.exists():
            raise RunError(f"{arg}: no such folder")
        if has_events(p):
            out.append(p)
            continue
        children = sorted(c for c in p.iterdir() if has_events(c)) if p.is_dir() else []
        if not children:
            raise RunError(f"{arg}: no gradwatch run here (no TensorBoard event files in it or its sub-folders); "
                           f"point at a folder passed to GradWatch(log_dir=...)")
        out.extend(children)
    return out


def load_run(path: Path) -> Run:
    from tensorboard.backend.event_processing import event_accumulator  # heavy import, only here

    acc = event_accumulator.EventAccumulator(os.fspath(path), size_guidance={
        event_accumulator.SCALARS: 0, event_accumulator.HISTOGRAMS: 0, event_accumulator.TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()
    meta = _read_meta(path)
    run = Run(path=path, layers=[], layer_types=meta.get("layer_types", {}), param_layer=meta.get("params", {}))
    from .sinks.tensorboard import LAYER_SCALARS, PARAM_SCALARS

    seen_layers = set()
    for tag in tags.get("scalars", []):
        prefix, _, name = tag.partition("/")
        if not name:
            continue
        series = [(e.step, e.value) for e in acc.Scalars(tag)]
        if prefix in LAYER_SCALARS:
            run.layer_scalars.setdefault(prefix, {})[name] = series
            seen_layers.add(name)
        elif prefix in PARAM_SCALARS:
            run.param_scalars.setdefault(prefix, {})[name] = series
    if not run.layer_scalars and not run.param_scalars:
        raise RunError(f"{path}: TensorBoard events, but no gradwatch tags in them")
    order = [n for n in meta.get("layers", []) if n in seen_layers]
    run.layers = order + sorted(seen_layers - set(order))
    for tag in tags.get("histograms", []):
        if tag.startswith("activation/"):
            run.histograms[tag.split("/", 1)[1]] = [
                (e.step, list(e.histogram_value.bucket_limit), list(e.histogram_value.bucket))
                for e in acc.Histograms(tag)]
    findings_path = path / FINDINGS_FILE
    if findings_path.exists():
        for line in findings_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                run.findings.append(json.loads(line))
    return run


def _read_meta(path: Path) -> dict:
    meta_path = path / META_FILE
    if not meta_path.exists():
        return {}
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if int(meta.get("format", 0)) != FORMAT_VERSION:
        raise RunError(f"{path}: written by gradwatch run format {meta.get('format')}; this gradwatch reads "
                       f"format {FORMAT_VERSION}")
    return meta
