"""The README and docs say what the code does: tag tables, finding kinds, the site's pages,
how to install, and the commands the demo leads to."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from gradwatch.report import FindingKind
from gradwatch.sinks.tensorboard import TAGS

ROOT = Path(__file__).resolve().parents[1]
KIND_WORDS = {"histogram": "histogram", "histograms": "histogram", "text": "text", "image": "image"}


def tag_table(path: Path, heading: str) -> set:
    """(kind, tag) for each tag in the first column of the first table after ``heading``."""
    text = path.read_text(encoding="utf-8")
    lines = text[text.index(heading):].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[first + 2:]:  # after the header and its separator
        if not line.startswith("|"):
            break
        table.append(line.split("|")[1].strip())
    found = set()
    for cell in table:
        kind = KIND_WORDS.get(cell.split()[0], "scalar")
        found |= {(kind, tag) for tag in re.findall(r"`([^`]+)`", cell)}
    return found


@pytest.mark.parametrize("doc, heading", [("README.md", "## TensorBoard tags"), ("docs/tags.md", "| tag | what |")])
def test_the_tag_tables_list_exactly_the_tags_the_sink_writes(doc, heading):
    assert tag_table(ROOT / doc, heading) == set(TAGS)


def test_the_tag_list_names_every_tag_a_run_writes(tmp_path):
    """Every tag written by a run that touches each feature matches one pattern of TAGS, and
    every pattern is written."""
    pytest.importorskip("matplotlib")
    import warnings

    import torch
    from tensorboard.backend.event_processing import event_accumulator
    from torch import nn

    from gradwatch import GradWatch
    from tests import models
    from tests.test_attention import make

    transformer = make()
    opt = torch.optim.Adam(transformer.parameters(), lr=1e-3)
    x = torch.randint(0, 20, (4, 12), generator=torch.Generator().manual_seed(0))
    with GradWatch(transformer, log_dir=tmp_path / "attn", optimizer=opt, every=1, histogram_every=1, quiet=True):
        for _ in range(2):
            loss = nn.functional.cross_entropy(transformer(x).reshape(-1, 20), x.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), models.NanAt(), nn.Linear(16, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with GradWatch(mlp, log_dir=tmp_path / "nan", every=1, include=["*"], quiet=True):
            models.train(mlp, 1)
            mlp[2].armed = True
            models.train(mlp, 1)
    mlp = models.small_mlp()  # two micro-batches a step: the gradient noise scale
    with GradWatch(mlp, log_dir=tmp_path / "noise", every=1, steps="manual", quiet=True) as watch:
        x, y = models.batch()
        for _ in range(2):
            for half in (slice(0, len(x) // 2), slice(len(x) // 2, None)):
                nn.functional.cross_entropy(mlp(x[half]), 0 * y[half]).backward()  # one class: |G|² > 0
            watch.step()
            mlp.zero_grad()
    written = set()
    for run in ("attn", "nan", "noise"):
        acc = event_accumulator.EventAccumulator(str(tmp_path / run), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        tags = acc.Tags()
        written |= {("scalar", t) for t in tags["scalars"]} | {("histogram", t) for t in tags["histograms"]}
        written |= {("image", t) for t in tags["images"]}
        written |= {("text", t) for t in tags["tensors"] if t != "custom_scalars__config__"}

    def pattern(tag: str) -> "re.Pattern[str]":
        return re.compile("^" + re.sub(r"<(layer|param|kind)>", ".+", re.escape(tag).replace(r"\<", "<")
                                       .replace(r"\>", ">")) + "$")

    patterns = [(kind, tag, pattern(tag)) for kind, tag in TAGS]
    unlisted = [w for w in written if not any(w[0] == kind and p.match(w[1]) for kind, _, p in patterns)]
    assert unlisted == []
    unwritten = [tag for kind, tag, p in patterns if not any(w[0] == kind and p.match(w[1]) for w in written)]
    assert unwritten == []


def test_the_fail_on_kinds_are_every_finding_kind(capsys):
    kinds = [k.value for k in FindingKind]
    cli_md = (ROOT / "docs/cli.md").read_text(encoding="utf-8")
    sentence = cli_md[cli_md.index("`--fail-on` takes"):].split("\n\n")[0]
    assert re.findall(r"`([a-z0-9_]+)`", sentence) == kinds
    from gradwatch.cli import main

    with pytest.raises(SystemExit):
        main(["report", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert ", ".join(kinds) in help_text


def test_the_site_lists_each_page_once():
    yaml = pytest.importorskip("yaml")
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]
    pages = [page for entry in nav for page in entry.values()]
    assert len(pages) == len(set(pages)), pages
    assert sorted(pages) == sorted(p.name for p in (ROOT / "docs").glob("*.md"))


def test_no_page_installs_from_pypi_what_is_not_there():
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for line in path.read_text(encoding="utf-8").splitlines():
            assert not re.search(r"pip install gradwatch\b(?!\[)", line), f"{path.name}: {line}"


def test_the_commands_after_the_demo_are_found_and_the_readme_gives_them(monkeypatch):
    from examples import demo

    monkeypatch.chdir(ROOT)
    for command in demo.next_commands("runs/demo"):  # from this interpreter, as the demo prints them
        program = command.split()[0]
        assert (os.access(program, os.X_OK) if os.sep in program else shutil.which(program)), command
    # Run by scripts/demo.sh without the venv activated: the README gives the same commands.
    monkeypatch.setattr(sys, "executable", str(ROOT / ".venv" / "bin" / "python"))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    commands = [c.split("#")[0].strip() for c in demo.next_commands("runs/demo")]
    assert [c.split()[0] for c in commands] == [os.path.join(".venv", "bin", "gradwatch"),
                                                os.path.join(".venv", "bin", "tensorboard")]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    after_demo = readme[readme.index("    bash scripts/demo.sh"):].split("\n\n")[2]
    assert [line.split("#")[0].strip() for line in after_demo.splitlines()] == commands
