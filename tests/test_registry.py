"""One registry of finding kinds: the enum, the warning categories, the terminal styles, the rule
modules and the docs' tables all agree with it."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from rich.style import Style

import gradwatch
from gradwatch import FindingKind, GradWatchWarning, exceptions
from gradwatch.rules.registry import KINDS, markdown_table

ROOT = Path(__file__).resolve().parent.parent


def test_every_finding_kind_is_in_the_registry_once():
    assert list(KINDS) == list(FindingKind)
    assert all(entry.kind is kind for kind, entry in KINDS.items())


def test_every_warning_category_belongs_to_one_kind_and_is_public():
    categories = [k.warning for k in KINDS.values()]
    assert len(set(categories)) == len(categories)
    declared = {c for _, c in inspect.getmembers(exceptions, inspect.isclass)
                if issubclass(c, GradWatchWarning) and c is not GradWatchWarning}
    assert declared == set(categories)  # no warning class without a kind, none missing
    for kind, entry in KINDS.items():
        assert kind.category is entry.warning
        assert entry.warning.__name__ in gradwatch.__all__ and entry.warning.__name__ in exceptions.__all__


def test_every_kind_has_a_style_rich_can_draw():
    for kind, entry in KINDS.items():
        assert kind.style == entry.style and Style.parse(entry.style)


def test_every_kind_has_its_own_rule_module():
    for kind, entry in KINDS.items():
        assert entry.module.__name__ == f"gradwatch.rules.{kind.value}"
        assert (ROOT / "gradwatch" / "rules" / f"{kind.value}.py").is_file()


def test_readme_findings_table_is_the_registrys():
    text = (ROOT / "README.md").read_text()
    assert markdown_table() in text, "README.md's findings table must be, verbatim:\n" + markdown_table()


def test_concepts_findings_table_has_a_row_for_every_kind_and_no_other():
    text = (ROOT / "docs" / "concepts.md").read_text()
    table = text.split("## Findings", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| kind")]
    kinds = {re.match(r"\| (\w+)", row).group(1) for row in rows}  # "learning_rate (blow-up)" is learning_rate
    assert kinds == {k.value for k in FindingKind}
