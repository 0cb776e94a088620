"""The distributed tests' process runner: a rank killed by a signal runs the ranks once more, an error does not."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from tests.helpers import run_ranks


def abort_on_first_attempt(rank: int, folder: str, attempt: int) -> None:
    Path(folder, f"rank{rank}.attempt{attempt}").touch()
    if attempt == 0 and rank == 1:
        os.abort()


def raise_on_first_attempt(rank: int, folder: str, attempt: int) -> None:
    Path(folder, f"rank{rank}.attempt{attempt}").touch()
    if attempt == 0:
        raise RuntimeError("a rank's own error")


@pytest.mark.timeout(120)
def test_a_killed_rank_runs_the_ranks_once_more(tmp_path):
    with pytest.warns(UserWarning, match="killed by SIGABRT"):
        args = run_ranks(abort_on_first_attempt, 2, lambda k: (str(tmp_path), k))
    assert args == (str(tmp_path), 1)
    assert (tmp_path / "rank1.attempt0").exists()  # the first attempt ran, and rank 1 aborted in it
    assert (tmp_path / "rank0.attempt1").exists() and (tmp_path / "rank1.attempt1").exists()


@pytest.mark.timeout(120)
def test_a_rank_that_raises_is_not_run_again(tmp_path):
    with pytest.raises(mp.ProcessRaisedException, match="a rank's own error"):
        run_ranks(raise_on_first_attempt, 2, lambda k: (str(tmp_path), k))
    assert not list(tmp_path.glob("*.attempt1"))

