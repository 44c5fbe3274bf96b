"""What every bundled example shares: arguments, seeding, the device, progress, results files, figures.

An example builds its parser with :func:`parser`, adds its own options, and calls
:func:`start`, which parses the arguments, seeds torch, sets the threads, picks the device
and makes the output folders. The returned :class:`Run` then loads the data
(:meth:`Run.load`), trains every variant under one progress display (:meth:`Run.train`),
or combines variants trained in separate processes (``--merge``, :meth:`Run.merged`), and
writes ``results.json`` (:meth:`Run.finish`). What is left in each example is its experiment.

Running the variants side by side (one process per activation, e.g. on one GPU), then
combining their results into one ``results.json`` and one set of figures::

    for a in elu relu sigmoid; do
        python -m examples.mnist_activations --activations $a --out parts/$a > parts/$a.log 2>&1 &
    done; wait
    python -m examples.mnist_activations --merge parts/elu parts/relu parts/sigmoid --out results
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, TypeVar

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console()
T = TypeVar("T")


# ----------------------------------------------------------------------------- arguments
def parser(description: Optional[str], *, data: bool = True, variants: Optional[Iterable[str]] = None,
           merge: bool = True, steps: Optional[Tuple[int, int]] = None, devices: bool = True) -> argparse.ArgumentParser:
    """The arguments every example takes.

    ``data``: the dataset options (``--data-dir``, ``--no-verify``, ``--no-download``); ``devices``:
    ``--device`` (an example that runs on the CPU whatever the machine has takes none);
    ``variants``: the names ``--activations`` chooses from; ``merge``: with variants, also
    ``--merge``; ``steps``: (full, quick) default step counts for ``--steps``."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short run (seconds to a couple of minutes on 2 CPU cores)")
    if data:
        p.add_argument("--data-dir", default=None, help="dataset root (default: $GRADWATCH_DATA or ./data)")
        p.add_argument("--no-verify", action="store_true", help="accept local dataset files that fail the official MD5")
        p.add_argument("--no-download", action="store_true", help="never download; fail if files are missing")
    if steps is not None:
        p.add_argument("--steps", type=int, default=None,
                       help=f"training steps per variant (default {steps[0]:,}; {steps[1]:,} with --quick)")
    if variants is not None:
        names = list(variants)
        p.add_argument("--activations", default=",".join(names), help="comma-separated subset of " + ", ".join(names))
    if variants is not None and merge:
        p.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                       help="train nothing: combine the results.json of runs made with --activations in separate "
                            "processes (e.g. side by side on one GPU) into one results.json and one set of figures")
    p.add_argument("--runs", default="runs", help="TensorBoard root; each variant writes runs/<example>/<variant>")
    p.add_argument("--out", default=None, help="folder for results.json and PNG figures (default: the runs folder)")
    if devices:
        p.add_argument("--device", default=None, type=device_name, help="cpu or cuda (default: cuda when available)")
    else:
        p.set_defaults(device="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    p.set_defaults(_steps=steps, _variants=list(variants) if variants is not None else None)  # for start()
    return p


def positive_int(value: str) -> int:
    """An argparse type: a whole number of 1 or more (argparse names the option in its error)."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: must be 1 or more")
    return n


def device_name(value: str) -> str:
    """An argparse type: a device torch knows and this machine has (argparse names the option)."""
    try:
        dev = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a device (cpu, cuda, cuda:1, mps, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value!r}: no CUDA device here (this torch: {torch.__version__})")
    return value


def device(name: Optional[str]) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe_device(dev: torch.device) -> str:
    """``cpu``, or ``cuda (NVIDIA H100 80GB HBM3)``: the card, for results files."""
    if dev.type == "cuda" and torch.cuda.is_available():
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)


# ----------------------------------------------------------------------------- one run of an example
@dataclass
class Run:
    """One invocation of an example: its arguments, device, folders, variants and clock."""

    example: str
    args: argparse.Namespace
    argv: List[str]
    device: torch.device
    runs: Path
    out: Path
    variants: List[str] = field(default_factory=list)
    steps: Optional[int] = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def quick(self) -> bool:
        return bool(self.args.quick)

    @property
    def mode(self) -> str:
        return "quick" if self.args.quick else "full"

    @property
    def merging(self) -> bool:
        return bool(getattr(self.args, "merge", None))

    @property
    def command(self) -> str:
        """How this run was started, as a relative ``python -m`` command line."""
        return f"python -m examples.{self.example} {shlex.join(self.argv)}".rstrip()

    def environment(self) -> Dict[str, Any]:
        """Seed, device and threads, for a results file's ``setup``."""
        return {"seed": self.args.seed, "device": describe_device(self.device), "threads": torch.get_num_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}

    def load(self, loader: Callable[[], T]) -> T:
        """``loader()``, with a missing or corrupt dataset reported as a one-line exit."""
        from examples.datasets import DatasetError

        try:
            return loader()
        except DatasetError as exc:
            raise SystemExit(f"{self.example}: {exc}") from None

    def dataset_options(self) -> Dict[str, bool]:
        return {"download": not self.args.no_download, "verify": not self.args.no_verify}

    def train(self, train_one: Callable[[str, Any, Any], dict]) -> Dict[str, dict]:
        """Train each variant under one progress display: ``train_one(name, progress, task)``.

        The gradwatch report each returns under ``"_report"`` is printed at the end and left out
        of the results."""
        results: Dict[str, dict] = {}
        with progress() as bar:
            overall = bar.add_task("variants", total=len(self.variants), status="")
            for name in self.variants:
                bar.update(overall, status=name)
                task = bar.add_task(f"  {name}", total=self.steps or 1, status="")
                results[name] = train_one(name, bar, task)
                bar.advance(overall)
        for name, r in results.items():
            report = r.pop("_report", None)
            if report is not None:
                console.rule(f"gradwatch: {name}")
                console.print(report)
        return results

    def train_or_merge(self, load: Callable[[], Tuple[Any, ...]], describe: Callable[..., Dict[str, Any]],
                       train_one: Callable[[str, Any, Tuple[Any, ...], Any, Any], dict]
                       ) -> Tuple[Dict[str, dict], Dict[str, Any], Optional[List[dict]]]:
        """An image study's results: merged from ``--merge`` folders, or trained here on the
        data ``load()`` returns as ``(x_train, y_train, x_test, y_test)`` (moved to the device).
        ``describe(run, n_train, n_test)`` gives the setup record; returns (results, setup, parts)."""
        if self.merging:
            return self.merged()
        xtr, ytr, xte, yte = self.load(load)
        data = tuple(t.to(self.device) for t in (xtr, ytr, xte, yte))
        setup = describe(self, len(xtr), len(xte))
        console.print(f"[bold]{self.example}[/]: {len(xtr):,} train / {len(xte):,} test images, {self.steps:,} "
                      f"steps per activation, device {setup['device']}, {setup['threads']} threads")
        return self.train(lambda act, bar, task: train_one(act, data, self, bar, task)), setup, None

    def merged(self) -> Tuple[Dict[str, dict], Dict[str, Any], List[dict]]:
        """The ``--merge`` folders' results: (variants, their common setup, one record per part).

        Each part must come from this example with the same setup apart from the device's
        threads; variants come out in the example's order."""
        results: Dict[str, dict] = {}
        setups: List[Tuple[str, dict]] = []
        parts: List[dict] = []
        for folder in self.args.merge:
            path = Path(folder) / "results.json"
            if not path.is_file():
                raise SystemExit(f"{self.example}: --merge {folder}: no results.json there")
            part = json.loads(path.read_text())
            if part.get("example") != self.example:
                raise SystemExit(f"{self.example}: --merge {folder}: results of {part.get('example')!r}, "
                                 f"not of {self.example}")
            clash = sorted(set(part["activations"]) & set(results))
            if clash:
                raise SystemExit(f"{self.example}: --merge {folder}: {clash} already came from another folder")
            results.update(part["activations"])
            setups.append((folder, part.get("setup", {})))
            parts.append({"activations": list(part["activations"]), "command": part.get("command"),
                          "wall_seconds": part.get("wall_seconds"), "written": part.get("written"),
                          "torch": part.get("torch")})
        first_folder, setup = setups[0]
        for folder, other in setups[1:]:
            differ = sorted(k for k in set(setup) | set(other) if k != "threads" and setup.get(k) != other.get(k))
            if differ:
                raise SystemExit(f"{self.example}: --merge: {folder} and {first_folder} differ in {differ}")
        order = [v for v in self.variants if v in results] + [v for v in results if v not in self.variants]
        self.variants = order
        self.steps = setup.get("steps", self.steps)
        return {v: results[v] for v in order}, setup, parts

    def finish(self, payload: Dict[str, Any], figures: Sequence[Path] = (),
               parts: Optional[List[dict]] = None) -> Dict[str, Any]:
        """Write ``results.json`` (example, mode, command, figures, wall time and ``payload``) and
        say where everything went. A merged run's wall time is its longest part's."""
        full = {"example": self.example, "mode": self.mode, "command": self.command, **payload,
                "figures": [Path(f).name for f in figures]}
        if parts is not None:
            full["parts"] = parts
            walls = [p["wall_seconds"] for p in parts if p.get("wall_seconds") is not None]
            full["wall_seconds"] = max(walls) if walls else None
            full["merge_seconds"] = seconds(self.started)
        else:
            full["wall_seconds"] = seconds(self.started)
        path = write_results(self.out, full)
        where = f"results: {path}"
        if figures:
            where += ", figures: " + ", ".join(str(f) for f in figures)
        if not self.merging and self.args.runs and self.runs.exists():
            where += f"   TensorBoard: tensorboard --logdir {self.runs}"
        console.print(f"{where}   ({full['wall_seconds']} s)")
        return full


def start(p: argparse.ArgumentParser, example: str, argv: Optional[List[str]] = None) -> Run:
    """Parse the arguments, seed torch, set its threads, pick the device, make the folders.

    ``--steps`` is resolved against the (full, quick) defaults given to :func:`parser` and
    checked; ``--activations`` is checked against the variants' names."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    names, steps = args._variants, args._steps
    del args._variants, args._steps
    chosen: List[str] = []
    if names is not None:
        chosen = [a.strip().lower() for a in args.activations.split(",") if a.strip()]
        unknown = [a for a in chosen if a not in names]
        if unknown or not chosen:
            p.error(f"unknown activation(s) {unknown}; choose from {names}")
    n_steps = None
    if steps is not None:
        n_steps = args.steps if args.steps is not None else (steps[1] if args.quick else steps[0])
        if n_steps < 1:
            p.error("--steps must be at least 1")
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = Path(args.runs) / example
    out = Path(args.out) if args.out else runs
    out.mkdir(parents=True, exist_ok=True)
    return Run(example=example, args=args, argv=argv, device=device(args.device), runs=runs, out=out,
               variants=chosen, steps=n_steps)


# ----------------------------------------------------------------------------- progress
class _LineProgress:
    """Progress as plain lines, for logs: a line per variant at every tenth of its steps."""

    def __init__(self) -> None:
        self._tasks: Dict[int, dict] = {}

    def __enter__(self) -> "_LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def add_task(self, description: str, total: float = 100, status: str = "", **_: Any) -> int:
        task = len(self._tasks)
        self._tasks[task] = {"name": description.strip(), "total": total, "completed": 0, "tenth": 0,
                             "t0": time.perf_counter()}
        return task

    def update(self, task: int, *, completed: Optional[float] = None, advance: float = 0, status: str = "",
               **_: Any) -> None:
        t = self._tasks[task]
        t["completed"] = completed if completed is not None else t["completed"] + advance
        tenth = int(10 * t["completed"] / t["total"]) if t["total"] else 10
        if tenth > t["tenth"] and t["total"] > 1:
            t["tenth"] = tenth
            elapsed = time.perf_counter() - t["t0"]
            console.print(f"{t['name']}: {t['completed']:,.0f}/{t['total']:,.0f} in {elapsed:.0f} s  {status}",
                          highlight=False, markup=False)

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)


def progress() -> Any:
    """A rich progress bar over steps and variants; plain lines every tenth when not a terminal."""
    if not console.is_terminal:
        return _LineProgress()
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=False)


# ----------------------------------------------------------------------------- training helpers
MAX_POINTS = 300
"""The most points a per-step series keeps in results.json (every series of a study at its full
schedule stays well under 200 KB); the full series are in the TensorBoard runs."""


class GradNormLog:
    """Per-layer weight-gradient norms as gradwatch measured them, one row per measured step.

    gradwatch publishes a step's numbers once the step is finished (at the next training
    forward, or on leaving the ``with`` block), so ``poll`` is called after every step."""

    def __init__(self, layers: list[str]) -> None:
        self.layers = layers
        self.steps: list[int] = []
        self.norms: Dict[str, list[float]] = {n: [] for n in layers}
        self._last: Optional[int] = None

    def poll(self, watch: Any) -> None:
        report = watch.report()
        if report.stats is None or report.step == self._last:
            return
        self._last = report.step
        params = report.params
        if not all(f"{n}.weight" in params for n in self.layers):
            return
        self.steps.append(report.step)
        for n in self.layers:
            self.norms[n].append(params[f"{n}.weight"].grad_norm)

    def last(self) -> Dict[str, float]:
        return {n: v[-1] for n, v in self.norms.items() if v}

    def thinned(self, max_points: int = MAX_POINTS) -> Dict[str, list]:
        """``{"steps": [...], layer: [...]}`` with at most about ``max_points`` rows: every k-th
        measured step, the last one always kept (for results.json; TensorBoard has them all)."""
        keep = thin_indices(len(self.steps), max_points)
        return {"steps": [self.steps[i] for i in keep], **{n: [v[i] for i in keep] for n, v in self.norms.items()}}


def thin_indices(n: int, max_points: int = MAX_POINTS) -> List[int]:
    """Every k-th index of ``n`` so that at most about ``max_points`` remain; the last is kept."""
    k = max(1, math.ceil(n / max_points))
    keep = list(range(0, n, k))
    if n and keep[-1] != n - 1:
        keep.append(n - 1)
    return keep


def block_means(values: Sequence[float], max_points: int = MAX_POINTS) -> Dict[str, Any]:
    """A per-step series as means of consecutive blocks of ``block`` steps, at most ``max_points``
    of them (the last block may be shorter): ``{"block": k, "mean": [...]}``."""
    k = max(1, math.ceil(len(values) / max_points))
    return {"block": k, "mean": [float(np.mean(values[i:i + k])) for i in range(0, len(values), k)]}


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator,
            steps: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` shuffled mini-batches, reshuffling at each epoch."""
    n = x.shape[0]
    done = 0
    while done < steps:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            if done >= steps:
                return
            idx = order[i:i + batch_size]
            yield x[idx], y[idx]
            done += 1


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        correct += (model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
    model.train(was_training)
    return correct / x.shape[0]


def findings_summary(watch: Any) -> list:
    """gradwatch's findings of a run, JSON-ready."""
    return [f.to_dict() for f in watch.findings]


def finding_kinds(findings: List[dict]) -> List[str]:
    """``kind@layer`` of every finding, in first-occurrence order."""
    return list(dict.fromkeys(f"{f['kind']}@{f['layer']}" for f in findings))


# ----------------------------------------------------------------------------- results files
def write_results(out: Path, payload: Mapping[str, Any]) -> Path:
    """``out/results.json``: indented, with lists of numbers kept on one line each."""
    path = out / "results.json"
    payload = {"written": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, **payload}
    path.write_text(_dumps(payload) + "\n")
    return path


def _dumps(value: Any, indent: int = 0) -> str:
    value = _plain(value)
    pad, inner = "  " * indent, "  " * (indent + 1)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(str(k))}: {_dumps(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list) and value and not all(v is None or isinstance(v, (int, float, bool)) for v in value):
        return "[\n" + ",\n".join(inner + _dumps(v, indent + 1) for v in value) + "\n" + pad + "]"
    return json.dumps(value, separators=(", ", ": "), allow_nan=False)


def _plain(v: Any) -> Any:
    """JSON-ready: paths as strings, tuples as lists, non-finite floats as null."""
    if isinstance(v, Path):
        return os.fspath(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, list) and v and all(isinstance(x, float) for x in v):
        return [float(f"{x:.5g}") if math.isfinite(x) else None for x in v]  # 5 digits: a figure's worth
    if isinstance(v, list) and any(isinstance(x, (float, Path, tuple)) for x in v):
        return [_plain(x) for x in v]
    if isinstance(v, (str, int, float, bool, list, dict)) or v is None:
        return v
    raise TypeError(f"not JSON-serialisable: {v!r}")


def pyplot():
    """matplotlib's pyplot on a file backend, with a clear message if the extra is missing."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("figures need matplotlib: pip install 'gradwatch[examples]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def seconds(t0: float) -> float:
    return round(time.perf_counter() - t0, 1)
