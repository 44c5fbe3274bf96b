"""``gradwatch`` on the command line: review one run, compare several.

    gradwatch report runs/mnist/relu [--json] [--fail-on dead_units,vanishing]
    gradwatch compare runs/mnist [--png flow.png] [--heatmap act.png]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import List, Optional, Sequence

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .report import FindingKind
from .runs import Run, RunError, find_runs, load_run


def _fmt(v: Optional[float], pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if pct:
        return f"{v:.0%}"
    return f"{v:.2g}" if v == 0 or 1e-2 <= abs(v) < 1e3 else f"{v:.1e}"


def layer_rows(run: Run) -> List[dict]:
    """Per layer: latest and worst saturation, worst dead fraction, latest gradient norm,
    and its ratio to the next weighted layer's (how much gradient survives one layer)."""
    weighted = run.weighted_layers()
    nxt = {a: b for a, b in zip(weighted, weighted[1:])}
    rows = []
    for name in run.layers:
        g = run.latest("gradient.layer_norm", name)
        g_next = run.latest("gradient.layer_norm", nxt[name]) if name in nxt else None
        rows.append({
            "layer": name, "type": run.layer_types.get(name, ""),
            "saturated_latest": run.latest("activation.saturated_fraction", name),
            "saturated_worst": run.worst("activation.saturated_fraction", name),
            "dead_worst": run.worst("activation.dead_fraction", name),
            "grad_norm": g,
            "grad_ratio_to_next": (g / g_next) if (g is not None and g_next) else None,
        })
    return rows


def report_table(run: Run) -> Table:
    t = Table(title=f"gradwatch report: {run.path}", box=box.SIMPLE_HEAD, header_style="bold")
    for col in ("layer", "type", "satur. now", "satur. worst", "dead worst", "∇W", "∇W / next"):
        t.add_column(col, justify="left" if col in ("layer", "type") else "right")
    flagged = {f["layer"] for f in run.findings}
    for r in layer_rows(run):
        t.add_row(Text(r["layer"], style="bold red" if r["layer"] in flagged else ""), r["type"],
                  _fmt(r["saturated_latest"], True), _fmt(r["saturated_worst"], True), _fmt(r["dead_worst"], True),
                  _fmt(r["grad_norm"]), _fmt(r["grad_ratio_to_next"]))
    return t


def findings_table(run: Run) -> Table:
    t = Table(title="findings", box=box.SIMPLE_HEAD, header_style="bold")
    for col in ("step", "kind", "layer", "value", "message"):
        t.add_column(col, overflow="fold")
    for f in run.findings:
        t.add_row(str(f["step"]), f["kind"], f["layer"], _fmt(f["value"] if isinstance(f["value"], float) else None),
                  f["message"])
    return t


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    runs = [load_run(p) for p in find_runs([args.run])]
    fail_on = _kinds(args.fail_on)
    if args.json:
        payload = [{"run": str(r.path), "layers": layer_rows(r), "findings": r.findings} for r in runs]
        console.print_json(json.dumps(payload[0] if len(payload) == 1 else payload))
    else:
        for run in runs:
            console.print(report_table(run))
            console.print(findings_table(run) if run.findings else Text("no findings", style="green"))
    hits = [f for r in runs for f in r.findings if f["kind"] in fail_on]
    if hits:
        print(f"gradwatch: {len(hits)} finding(s) of kind {', '.join(sorted(fail_on))}", file=sys.stderr)
        return 1
    return 0


def cmd_compare(args: argparse.Namespace, console: Console) -> int:
    runs = [load_run(p) for p in find_runs(args.runs)]
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
        for r in runs:
            t.add_column(r.name, justify="right")
        for n in rows:
            t.add_row(n, *[_fmt(getattr(r, how)(stat, n), pct) for r in runs])
        console.print(t)
    t = Table(title="findings per run", box=box.SIMPLE_HEAD, header_style="bold")
    t.add_column("run")
    for k in FindingKind:
        t.add_column(k.value, justify="right")
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


def _kinds(value: Optional[str]) -> set:
    if not value:
        return set()
    kinds = {k.strip() for k in value.split(",") if k.strip()}
    known = {k.value for k in FindingKind}
    bad = kinds - known
    if bad:
        raise SystemExit(f"gradwatch: --fail-on: unknown kind(s) {sorted(bad)}; known: {sorted(known)}")
    return kinds


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="gradwatch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="per-layer table and findings timeline of one run")
    rep.add_argument("run", help="a run folder (the log_dir given to GradWatch)")
    rep.add_argument("--json", action="store_true", help="machine-readable output")
    rep.add_argument("--fail-on", metavar="KIND[,KIND]",
                     help=f"exit 1 when a finding of these kinds occurred ({', '.join(k.value for k in FindingKind)})")
    cmp_ = sub.add_parser("compare", help="the same stats side by side across runs")
    cmp_.add_argument("runs", nargs="+", help="run folders, or a parent folder of runs")
    cmp_.add_argument("--png", help="write a gradient-flow chart (gradient norm against depth, per run)")
    cmp_.add_argument("--heatmap", help="write activation-histogram-over-time heat maps per run and layer")
    args = parser.parse_args(argv)
    console = Console()
    try:
        return cmd_report(args, console) if args.command == "report" else cmd_compare(args, console)
    except RunError as exc:
        print(f"gradwatch: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
