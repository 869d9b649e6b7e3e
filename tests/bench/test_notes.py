"""docs/benchmarks.md is ``bench.run_all``'s report followed by bench/NOTES.md: the
hand-written sections live in NOTES.md, which the report appends, so a full run keeps
them. One function, no measurement."""

from __future__ import annotations

from bench import run_all
from bench.common import ROOT


def test_the_hand_written_sections_of_the_benchmarks_doc_are_the_notes_run_all_appends():
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    notes = run_all.NOTES.read_text().strip()
    # A section written into docs/benchmarks.md alone would vanish at the next full run.
    assert doc.rstrip().endswith(notes), "docs/benchmarks.md and bench/NOTES.md differ"
    assert doc.index("## What limits it") < doc.index(notes.splitlines()[0])
