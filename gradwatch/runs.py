"""Reading gradwatch runs back from disk: TensorBoard event files (with TensorBoard's own
reader), ``findings.jsonl`` and ``gradwatch.json``. Used by the ``gradwatch`` command.

A folder may hold several runs (a script run twice into one ``log_dir``). Each run's entry
in ``gradwatch.json`` names its event files, and its findings carry its id; the latest run
is read unless another is asked for. Folders written before run ids existed read as one
run, ``legacy``; so do event files no entry claims (written by an older gradwatch).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .sinks.jsonl import FINDINGS_FILE, FORMAT_VERSION, META_FILE, event_file_pid

Series = List[Tuple[int, float]]
LEGACY_RUN = "legacy"
"""The id given to what a folder holds from before run ids: event files no run entry claims."""


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
    run_id: Optional[str] = None  # None: the folder has no run ids at all (written before they existed)
    run_ids: List[str] = field(default_factory=list)  # every run in the folder, oldest first
    param_numel: Dict[str, int] = field(default_factory=dict)  # empty for runs written before it was kept
    label: Optional[str] = None  # how `compare` names it when folder names are not enough

    @property
    def name(self) -> str:
        return self.label or self.path.name

    def series(self, stat: str, layer: str) -> Series:
        return self.layer_scalars.get(stat, {}).get(layer, [])

    def latest(self, stat: str, layer: str) -> Optional[float]:
        s = self.series(stat, layer)
        return s[-1][1] if s else None

    def worst(self, stat: str, layer: str) -> Optional[float]:
        values = [v for _, v in self.series(stat, layer) if math.isfinite(v)]
        return max(values) if values else None

    @property
    def sized(self) -> bool:
        """Whether gradients can be compared per weight: the run folder records parameter sizes, or
        it has no parameter gradient at all (no backward ran: nothing to compare). Only folders
        written before sizes were kept have gradients without them."""
        return bool(self.param_numel) or not (self.param_scalars or self.layer_scalars.get("gradient.layer_norm"))

    def weighted_layers(self) -> List[str]:
        """Layers with parameter gradients, in forward order."""
        with_grads = set(self.layer_scalars.get("gradient.layer_norm", {}))
        return [n for n in self.layers if n in with_grads]

    def layer_numel(self, layer: str) -> Optional[int]:
        """Number of parameter elements of a layer (its parameters' sizes summed), if recorded."""
        sizes = [self.param_numel[p] for p, owner in self.param_layer.items()
                 if owner == layer and p in self.param_numel]
        return sum(sizes) if sizes else None


@dataclass(frozen=True)
class RunEntry:
    """What ``gradwatch.json`` says about one run in a folder."""

    run_id: str
    event_files: List[str]
    meta: Dict[str, Any]

    @property
    def started(self) -> str:
        return str(self.meta.get("started", ""))


def has_events(folder: Path) -> bool:
    return folder.is_dir() and any(p.name.startswith("events.out.tfevents") for p in folder.iterdir())


def find_runs(paths: List[str]) -> List[Path]:
    """Each argument is a run folder, or a parent whose sub-folders are runs (``runs/mnist``)."""
    out: List[Path] = []
    for arg in paths:
        p = Path(arg)
        if not p.exists():
            raise RunError(f"{arg}: no such folder")
        if not p.is_dir():
            raise RunError(f"{arg}: a file, not a folder; point at the folder passed to GradWatch(log_dir=...)")
        if has_events(p):
            out.append(p)
            continue
        children = sorted(c for c in p.iterdir() if has_events(c)) if p.is_dir() else []
        if not children:
            raise RunError(f"{arg}: no gradwatch run here (no TensorBoard event files in it or its sub-folders); "
                           f"point at a folder passed to GradWatch(log_dir=...)")
        out.extend(children)
    return out


def load_runs(paths: List[str], run_id: Optional[str] = None) -> Tuple[List["Run"], List[str]]:
    """The runs of :func:`find_runs`' folders, and why each sub-folder that holds no gradwatch run
    was passed over: found under a parent folder, another program's TensorBoard run (a Hugging Face
    Trainer's beside gradwatch's) is skipped; a folder named itself must be a run."""
    runs: List[Run] = []
    skipped: List[str] = []
    for arg in paths:
        p = Path(arg)
        if not p.exists() or has_events(p):
            runs += [load_run(f, run_id) for f in find_runs([arg])]
            continue
        found: List[Run] = []
        for child in find_runs([arg]):
            try:
                found.append(load_run(child, run_id))
            except RunError as exc:
                skipped.append(str(exc))
        if not found:
            raise RunError(skipped[0] if len(skipped) == 1 else
                           f"{arg}: no gradwatch run in its sub-folders ({'; '.join(skipped)})")
        runs += found
    return runs, skipped


def run_entries(path: Path) -> List[RunEntry]:
    """The runs in a folder, oldest first. Every event file belongs to exactly one of them."""
    meta = _read_meta(path)
    files = sorted(p.name for p in path.iterdir() if p.name.startswith("events.out.tfevents"))
    recorded = [r for r in meta.get("runs", []) if isinstance(r, dict) and r.get("run")]
    claimed = {f for r in recorded for f in r.get("event_files", [])}
    unclaimed = [f for f in files if f not in claimed]
    entries: List[RunEntry] = []
    for r in recorded:
        own = [f for f in r.get("event_files", []) if f in files]
        if not own:  # written before its event file existed: take the unclaimed ones of its process
            own = [f for f in unclaimed if event_file_pid(f) == r.get("pid")]
            unclaimed = [f for f in unclaimed if f not in own]
        entries.append(RunEntry(str(r["run"]), own, r))
    if unclaimed or not recorded:
        # Older than run ids: one run made of everything no entry claims. Its layer order
        # comes from the folder's top-level record (what older versions wrote).
        legacy_meta = {k: meta[k] for k in ("layers", "layer_types", "params") if k in meta}
        entries.insert(0, RunEntry(LEGACY_RUN, unclaimed, legacy_meta))
    return entries


def select_run(entries: List[RunEntry], run_id: Optional[str], path: Path) -> RunEntry:
    """The run ``run_id`` names (exactly, or a prefix only it has); the latest when ``None``."""
    if run_id is None:
        return entries[-1]
    exact = [e for e in entries if e.run_id == run_id]
    matches = exact or [e for e in entries if e.run_id.startswith(run_id)]
    if len(matches) == 1:
        return matches[0]
    ids = ", ".join(e.run_id for e in entries)
    what = "matches several runs" if matches else "is not a run"
    raise RunError(f"{path}: --run {run_id!r} {what} in this folder; its runs (oldest first): {ids}")


def load_run(path: Path, run_id: Optional[str] = None) -> Run:
    """One run of a folder: the latest, or the one ``run_id`` names (see :func:`select_run`)."""
    from tensorboard.backend.event_processing import event_accumulator  # heavy import, only here

    entries = run_entries(path)
    entry = select_run(entries, run_id, path)
    meta = entry.meta
    hint = meta if meta.get("layers") else next((e.meta for e in entries if e.meta.get("layers")), {})
    run = Run(path=path, layers=[], layer_types=meta.get("layer_types") or hint.get("layer_types", {}),
              param_layer=meta.get("params") or hint.get("params", {}),
              param_numel=meta.get("param_numel") or {},
              run_id=None if entry.run_id == LEGACY_RUN and len(entries) == 1 else entry.run_id,
              run_ids=[e.run_id for e in entries])
    from .sinks.tensorboard import LAYER_SCALARS, PARAM_SCALARS

    seen_layers = set()
    scalars: Dict[str, Series] = {}
    histograms: Dict[str, List[Tuple[int, List[float], List[float]]]] = {}
    for name in entry.event_files:
        acc = event_accumulator.EventAccumulator(os.fspath(path / name), size_guidance={
            event_accumulator.SCALARS: 0, event_accumulator.HISTOGRAMS: 0, event_accumulator.TENSORS: 0})
        acc.Reload()
        tags = acc.Tags()
        for tag in tags.get("scalars", []):
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        for tag in tags.get("histograms", []):
            if tag.startswith("activation/"):
                histograms.setdefault(tag.split("/", 1)[1], []).extend(
                    (e.step, *_buckets(e.histogram_value)) for e in acc.Histograms(tag))
    for tag, series in scalars.items():
        prefix, _, name = tag.partition("/")
        if not name:
            continue
        series = sorted(series, key=lambda sv: sv[0])
        if prefix in LAYER_SCALARS:
            run.layer_scalars.setdefault(prefix, {})[name] = series
            seen_layers.add(name)
        elif prefix in PARAM_SCALARS:
            run.param_scalars.setdefault(prefix, {})[name] = series
    if not run.layer_scalars and not run.param_scalars:
        which = f"run {entry.run_id}" if len(entries) > 1 else "TensorBoard events"
        others = f"; other runs here: {', '.join(e.run_id for e in entries if e is not entry)}" \
            if len(entries) > 1 else ""
        why = ("no measured step was recorded (the run ended before its first measured step was handed on)"
               if entry.meta else "no gradwatch tags in its event files (another program's run, or unreadable files)")
        raise RunError(f"{path}: {which}: {why}{others}")
    order = [n for n in (meta.get("layers") or hint.get("layers", [])) if n in seen_layers]
    run.layers = order + sorted(seen_layers - set(order))
    run.histograms = {n: sorted(h, key=lambda e: e[0]) for n, h in histograms.items()}
    findings_path = path / FINDINGS_FILE
    if findings_path.exists():
        lines = findings_path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                if i == len(lines) - 1:  # a last line cut short (the process was killed while writing)
                    continue
                raise RunError(f"{findings_path}: line {i + 1} is not JSON ({exc}); remove or mend that line") from None
            if isinstance(record, dict) and record.get("run", LEGACY_RUN) == entry.run_id:
                run.findings.append(record)
    return run


def _buckets(h: Any) -> Tuple[List[float], List[float]]:
    """A histogram's bucket right limits and counts. One of a single value (``min == max``:
    a dead layer, written so by older versions with limits running from ``min + 1`` upwards)
    is read as :func:`~gradwatch.sinks.tensorboard.single_value_buckets` writes it now."""
    if h.min == h.max and h.num > 0:
        from .sinks.tensorboard import single_value_buckets

        _, _, limits, counts = single_value_buckets(h.min, h.num, len(h.bucket))
        return limits, counts
    return list(h.bucket_limit), list(h.bucket)


def _read_meta(path: Path) -> dict:
    meta_path = path / META_FILE
    if not meta_path.exists():
        return {}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise RunError(f"{meta_path}: not JSON ({exc}): the file is damaged; delete it to read the run from its "
                       f"event files alone") from None
    if not isinstance(meta, dict):
        raise RunError(f"{meta_path}: not a gradwatch run description; delete it to read the run from its event files")
    if int(meta.get("format", 0)) != FORMAT_VERSION:
        raise RunError(f"{path}: written by gradwatch run format {meta.get('format')}; this gradwatch reads "
                       f"format {FORMAT_VERSION}")
    return meta
