"""docs/RELIABILITY.md matches the fault markers of the test suite."""

from __future__ import annotations

from tests.reliability import DOC, faults, render


def test_every_fault_marker_carries_input_message_and_what_is_kept():
    rows = faults()
    assert len(rows) >= 10
    incomplete = [r.test for r in rows if not (r.input and r.message and r.kept)]
    assert not incomplete, f"fault markers without input, message or kept: {incomplete}"


def test_reliability_doc_is_generated_from_the_markers():
    assert DOC.read_text() == render(faults()), "docs/RELIABILITY.md is stale: run `python -m tests.reliability`"
