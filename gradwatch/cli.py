"""``gradwatch`` on the command line: review one run, compare several.

    gradwatch report runs/mnist/relu [--run ID] [--json] [--fail-on dead_units,vanishing]
    gradwatch compare runs/mnist [--run ID] [--png flow.png] [--heatmap act.png]

A folder written to more than once holds several runs; the latest is read unless
``--run ID`` (a run id, or a prefix only one run has) names another.

Exit codes: 0 fine, 1 findings of a ``--fail-on`` kind present, 2 usage error or no run found.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, List, Optional, Sequence

from rich import box
from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

from .render import Column, FittedTable
from .report import FindingKind
from .runs import Run, RunError, find_runs, load_run, load_runs, run_entries

KINDS = [k.value for k in FindingKind]


def _fmt(v: Optional[float], pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if pct:
        return f"{v:.0%}"
    from .render import _num

    return _num(v)


def flow_reference(run: Run) -> Optional[str]:
    """The layer gradient flow is compared against, as the vanishing rule does: the last weighted
    layer that is not an embedding or a normalisation layer."""
    weighted = run.weighted_layers()
    compared = [n for n in weighted if not any(w in run.layer_types.get(n, "").lower() for w in ("embedding", "norm"))]
    return (compared or weighted or [None])[-1]


def layer_rows(run: Run) -> List[dict]:
    """Per layer: latest and worst saturation, worst dead fraction, latest gradient norm, and its
    gradient per weight (RMS: norm / √elements, what the vanishing rule compares) over the last
    layer's, at the last logged step (``grad_rms_ratio_to_last``; None for run folders that did not
    record parameter sizes). ``grad_ratio_to_last`` and ``grad_ratio_to_next`` (raw norms, to the
    last and to the next weighted layer) are kept for existing JSON readers."""
    weighted = run.weighted_layers()
    nxt = {a: b for a, b in zip(weighted, weighted[1:])}
    g_last = run.latest("gradient.layer_norm", weighted[-1]) if weighted else None
    ref = flow_reference(run)

    def rms(name: Optional[str]) -> Optional[float]:
        g = run.latest("gradient.layer_norm", name) if name else None
        numel = run.layer_numel(name) if name else None
        return g / math.sqrt(numel) if g is not None and numel else None

    rms_last = rms(ref)
    rows = []
    for name in run.layers:
        g = run.latest("gradient.layer_norm", name)
        g_next = run.latest("gradient.layer_norm", nxt[name]) if name in nxt else None
        r = rms(name)
        rows.append({
            "layer": name, "type": run.layer_types.get(name, ""),
            "saturated_latest": run.latest("activation.saturated_fraction", name),
            "saturated_worst": run.worst("activation.saturated_fraction", name),
            "dead_worst": run.worst("activation.dead_fraction", name),
            "grad_norm": g,
            "grad_rms": r,
            "grad_rms_ratio_to_last": (r / rms_last) if (r is not None and rms_last) else None,
            "grad_ratio_to_last": (g / g_last) if (g is not None and g_last) else None,
            "grad_ratio_to_next": (g / g_next) if (g is not None and g_next) else None,
        })
    return rows


_REPORT_COLUMNS = [
    Column("layer", justify="left", flexible=True),
    Column("type", justify="left"),
    Column("satur. now", "share of saturated outputs at the last logged step"),
    Column("satur. worst", "highest share of saturated outputs over the run"),
    Column("dead worst", "highest share of dead units over the run"),
    Column("∇W", "L2 norm of the gradient of the layer's parameters, last logged step"),
]
_FLOW = "∇ rms / last"
_REPORT_DROP_ORDER = ("type", "satur. now", _FLOW, "∇W / last")


def _flow_column(run: Run) -> Column:
    ref = flow_reference(run)
    series = run.series("gradient.layer_norm", ref) if ref else []
    at = f"step {series[-1][0]}, the last logged" if series else "the last logged step"
    if not run.sized:
        return Column("∇W / last", f"∇W over layer {ref}'s, at {at} (raw norms: this run folder has no "
                                   f"parameter sizes to compare gradients per weight)")
    return Column(_FLOW, f"the layer's gradient per weight (RMS: ∇W / √elements) over layer {ref}'s, at {at}; "
                         f"the vanishing rule compares the same and flags the first layer's below 1e-3 by default")


def _run_line(run: Run) -> str:
    if run.run_id is None:
        return ""
    others = [r for r in run.run_ids if r != run.run_id]
    if not others:
        return f"run {run.run_id}"
    latest = "the latest" if run.run_ids[-1] == run.run_id else "not the latest"
    return (f"run {run.run_id} ({latest} of {len(run.run_ids)} in this folder; others: {', '.join(others)}; "
            f"pick one with --run ID)")


def report_table(run: Run) -> FittedTable:
    flagged = {f["layer"] for f in run.findings}
    ratio = "grad_rms_ratio_to_last" if run.sized else "grad_ratio_to_last"
    rows = []
    for r in layer_rows(run):
        rows.append([Text(r["layer"], style="bold red" if r["layer"] in flagged else ""), Text(r["type"]),
                     Text(_fmt(r["saturated_latest"], True)), Text(_fmt(r["saturated_worst"], True)),
                     Text(_fmt(r["dead_worst"], True)), Text(_fmt(r["grad_norm"])),
                     Text(_fmt(r[ratio]))])
    line = _run_line(run)
    return FittedTable(_REPORT_COLUMNS + [_flow_column(run)], rows,
                       title=f"gradwatch report: {run.path}" + (f"\n{line}" if line else ""),
                       drop_order=_REPORT_DROP_ORDER,
                       legend_extra="-: does not apply to this layer or was not measured")


class FindingsList:
    """A run's findings: a table where the terminal has room for one (72 columns and more), else a
    line per finding (step, kind, layer, value) with its message below: in a table that narrow the
    message column would be a few letters wide."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if options.max_width >= 72:
            yield findings_table(self.run)
            return
        yield Text("findings", style="bold")
        for f in self.run.findings:
            line = Text.assemble((f"step {f['step']} ", "dim"), (f"{f['kind']} ", "bold"), Text(f["layer"]))
            value = _fmt(f["value"] if isinstance(f["value"], float) else None)
            if value != "-":
                line.append(f"  {value}")
            line.append("\n  " + f["message"])
            yield line


def findings_table(run: Run) -> Table:
    t = Table(title="findings", box=box.SIMPLE_HEAD, header_style="bold")
    # Numbers and kinds stay whole (never "5.5e-" over "10"); the layer and the message take the wrapping.
    for col in ("step", "kind"):
        t.add_column(col, no_wrap=True)
    t.add_column("layer", overflow="fold", ratio=1)
    t.add_column("value", no_wrap=True)
    t.add_column("message", overflow="fold", ratio=3)
    for f in run.findings:
        t.add_row(str(f["step"]), f["kind"], Text(f["layer"]),  # never markup: the user's layer names
                  _fmt(f["value"] if isinstance(f["value"], float) else None), Text(f["message"]))
    return t


def _finite(value: Any) -> Any:
    """``value`` with every NaN or Inf float replaced by None (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _skipped(skipped: List[str]) -> None:
    for why in skipped:
        print(f"gradwatch: skipped {why}", file=sys.stderr)


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    runs, skipped = load_runs([args.folder], args.run)
    _skipped(skipped)
    fail_on = set(args.fail_on or ())
    if args.json:
        payload = [{"run": str(r.path), "run_id": r.run_id, "run_ids": r.run_ids, "layers": layer_rows(r),
                    "findings": r.findings} for r in runs]
        # Strict JSON: NaN and Inf (a non-finite gradient's norm) become null, as in findings.jsonl.
        console.print_json(json.dumps(_finite(payload[0] if len(payload) == 1 else payload), allow_nan=False))
    else:
        for run in runs:
            console.print(report_table(run))
            console.print(FindingsList(run) if run.findings else Text("no findings", style="green"))
    hits = [f for r in runs for f in r.findings if f["kind"] in fail_on]
    if hits:
        print(f"gradwatch: {len(hits)} finding(s) of kind {', '.join(sorted({f['kind'] for f in hits}))}",
              file=sys.stderr)
        return 1
    return 0


def _compare_runs(folders: List[str], run_ids: Optional[List[str]]) -> List[Run]:
    if not run_ids:
        runs, skipped = load_runs(folders)
        _skipped(skipped)
    else:
        paths = find_runs(folders)
        runs, found = [], set()
        for p in paths:
            here = {e.run_id for e in run_entries(p)}
            for rid in run_ids:
                if rid in here or any(h.startswith(rid) for h in here):
                    runs.append(load_run(p, rid))
                    found.add(rid)
        missing = [rid for rid in run_ids if rid not in found]
        if missing:
            raise RunError(f"--run {', '.join(missing)}: no such run in {', '.join(folders)} "
                           f"(run ids are listed by `gradwatch report FOLDER`)")
    names = [r.path.name for r in runs]
    for r in runs:
        if names.count(r.path.name) > 1 and r.run_id:
            r.label = f"{r.path.name}@{r.run_id}"
    return runs


def cmd_compare(args: argparse.Namespace, console: Console) -> int:
    runs = _compare_runs(args.runs, args.run)
    layers: List[str] = []
    for r in runs:
        layers += [n for n in r.layers if n not in layers]
    for stat, title, pct, how in (("gradient.layer_norm", "gradient norm of the layer's parameters (latest)", False,
                                   "latest"),
                                  ("activation.saturated_fraction", "saturated fraction (worst)", True, "worst"),
                                  ("activation.dead_fraction", "dead fraction (worst)", True, "worst")):
        rows = [n for n in layers if any(r.series(stat, n) for r in runs)]
        if not rows:
            continue
        t = Table(title=title, box=box.SIMPLE_HEAD, header_style="bold")
        t.add_column("layer")
        for r in runs:  # (a long name wraps rather than lose its end: runs often differ only there)
            t.add_column(r.name, justify="right", overflow="fold")
        for n in rows:
            t.add_row(Text(n), *[_fmt(getattr(r, how)(stat, n), pct) for r in runs])
        console.print(t)
    t = Table(title="findings per run", box=box.SIMPLE_HEAD, header_style="bold")
    t.add_column("run", overflow="fold")
    for k in FindingKind:
        t.add_column(k.value, justify="right", overflow="fold")
    for r in runs:
        t.add_row(r.name, *[str(sum(f["kind"] == k.value for f in r.findings)) for k in FindingKind])
    console.print(t)
    if args.png:
        from .figures import gradient_flow

        gradient_flow(runs, args.png)
        console.print(f"wrote {args.png}")
    if args.heatmap:
        from .figures import activation_heatmaps

        activation_heatmaps(runs, args.heatmap)
        console.print(f"wrote {args.heatmap}")
    return 0


def _kinds(value: str) -> List[str]:
    """``--fail-on``'s value: comma-separated finding kinds; anything else is a usage error (exit 2)."""
    kinds = [k.strip() for k in value.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"unknown finding kind(s) {', '.join(map(repr, bad)) or repr(value)}; "
                                         f"valid kinds: {', '.join(KINDS)}")
    return kinds


def _pipe_closed() -> None:
    raise BrokenPipeError


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="gradwatch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="per-layer table and findings timeline of one run")
    rep.add_argument("folder", metavar="run", help="a run folder (the log_dir given to GradWatch)")
    rep.add_argument("--run", metavar="ID", help="which run of the folder (default: the latest)")
    rep.add_argument("--json", action="store_true", help="machine-readable output")
    rep.add_argument("--fail-on", metavar="KIND[,KIND]", type=_kinds,
                     help=f"exit 1 when a finding of these kinds occurred ({', '.join(KINDS)})")
    cmp_ = sub.add_parser("compare", help="the same stats side by side across runs")
    cmp_.add_argument("runs", nargs="+", help="run folders, or a parent folder of runs")
    cmp_.add_argument("--run", metavar="ID", action="append",
                      help="compare these runs (repeat the option) instead of each folder's latest")
    cmp_.add_argument("--png", help="write a gradient-flow chart (per-element gradient scale against depth, per run)")
    cmp_.add_argument("--heatmap", help="write activation-histogram-over-time heat maps per run and layer")
    args = parser.parse_args(argv)
    console = Console()
    console.on_broken_pipe = _pipe_closed  # type: ignore[method-assign]
    try:
        return cmd_report(args, console) if args.command == "report" else cmd_compare(args, console)
    except RunError as exc:
        print(f"gradwatch: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader left (`gradwatch report runs/x | head`): no traceback, and not
        # exit 1, which says a --fail-on finding was present (rich's own handler exits with 1)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python flushes stdout at exit)
        return 141  # 128 + SIGPIPE, as a shell reports a process a closed pipe ended


if __name__ == "__main__":
    sys.exit(main())
