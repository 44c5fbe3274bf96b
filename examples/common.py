"""What every bundled example shares: arguments, the device, progress bars, results files, figures."""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console()


def parser(description: str) -> argparse.ArgumentParser:
    """The arguments every example takes."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short run (seconds to a couple of minutes on 2 CPU cores)")
    p.add_argument("--data-dir", default=None, help="dataset root (default: $GRADWATCH_DATA or ./data)")
    p.add_argument("--no-verify", action="store_true", help="accept local dataset files that fail the official MD5")
    p.add_argument("--no-download", action="store_true", help="never download; fail if files are missing")
    p.add_argument("--runs", default="runs", help="TensorBoard root; each variant writes runs/<example>/<variant>")
    p.add_argument("--out", default=None, help="folder for results.json and PNG figures (default: the runs folder)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    return p


def device(name: Optional[str]) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup(args: argparse.Namespace, example: str) -> Tuple[torch.device, Path, Path]:
    """Seed, threads, device, and the run/output folders of an example."""
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = Path(args.runs) / example
    out = Path(args.out) if args.out else runs
    out.mkdir(parents=True, exist_ok=True)
    return device(args.device), runs, out


def progress() -> Progress:
    """A rich progress bar over steps and variants (plain lines when not a terminal)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=False)


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


def run_variants(names, steps: int, train_one) -> Dict[str, dict]:
    """Train each variant (an activation) under one progress display, then print the
    gradwatch report each returned under ``"_report"``. ``train_one(name, progress, task)``."""
    results: Dict[str, dict] = {}
    with progress() as bar:
        overall = bar.add_task("activations", total=len(names), status="")
        for name in names:
            bar.update(overall, status=name)
            task = bar.add_task(f"  {name}", total=steps, status="")
            results[name] = train_one(name, bar, task)
            bar.advance(overall)
    for name, r in results.items():
        console.rule(f"gradwatch: {name}")
        console.print(r.pop("_report"))
    return results


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


def write_results(out: Path, payload: Dict[str, Any]) -> Path:
    path = out / "results.json"
    payload = {"written": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, **payload}
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    return path


def _json_default(v: Any) -> Any:
    if isinstance(v, Path):
        return os.fspath(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
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
