"""Checkpoint metadata is read without unpickling code."""
from __future__ import annotations

import pytest
import torch

from omnibal_pl.errors import ConfigError
from omnibal_pl.parallel.dcp import load_meta


def test_plain_metadata_loads(tmp_path):
    meta = {"epoch": 3, "loops": {"fit_loop": {"step": 7}}, "datamodule": {"sampler": {"seed": 0}},
            "t": torch.ones(2)}
    torch.save(meta, tmp_path / "meta.pt")
    loaded = load_meta(tmp_path / "meta.pt")
    assert loaded["loops"] == meta["loops"] and torch.equal(loaded["t"], meta["t"])


class Payload:
    """Stands for any class a pickle could name (and so construct) while loading."""


def test_metadata_with_arbitrary_objects_is_refused(tmp_path):
    torch.save({"payload": Payload()}, tmp_path / "meta.pt")
    with pytest.raises(ConfigError, match="not unpickled"):
        load_meta(tmp_path / "meta.pt")
