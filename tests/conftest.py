"""Shared fixtures: the real statistics in ../shared (CI has them beside the clone)."""
from __future__ import annotations

import pytest
import torch

from omnibal_pl.lengths import LengthTable, load_lengths

from tests.helpers import REAL_LENGTH_FILES, SHARED_DATA

# Tests run two at a time (xdist) on a small shared machine: intra-op threads beyond one spin-wait
# against each other and make small matmuls tens of times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def real_lengths() -> LengthTable:
    if len(REAL_LENGTH_FILES) != 4:
        pytest.skip(f"the four real statistics files are not in {SHARED_DATA / 'omnibal_lengths'}")
    return load_lengths(REAL_LENGTH_FILES)
