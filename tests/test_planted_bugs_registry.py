"""The planted-bug registry (scripts/planted_bugs.py) stays applicable: every mutation's text occurs exactly once
in its file, so a refactor that moves a line shows up here and not as a mutation that silently cannot apply."""
from __future__ import annotations

import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_every_registered_mutation_applies_exactly_once():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import planted_bugs
    finally:
        sys.path.remove(str(SCRIPTS))
    counts = {(m.name, e.path): (planted_bugs.ROOT / e.path).read_text().count(e.before)
              for m in planted_bugs.MUTATIONS + planted_bugs.EQUIVALENT for e in m.edits}
    assert len(counts) > 80
    assert {k: c for k, c in counts.items() if c != 1} == {}
