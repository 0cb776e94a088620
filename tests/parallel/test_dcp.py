"""Distributed checkpoints: metadata read without unpickling code, folders published whole (temporary name, rename)."""
from __future__ import annotations

import pytest
import torch

import omnibal_pl.parallel.dcp as dcp_module
from omnibal_pl.errors import ConfigError
from omnibal_pl.parallel.dcp import load_meta, save
from omnibal_pl.train.checkpoints import latest_checkpoint


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


class SideEffect:
    """Unpickling it opens (creates) ``path``: any code a pickle names would run the same way."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_metadata_with_a_side_effect_payload_is_refused_without_running_it(tmp_path):
    torch.save({"epoch": 1, "payload": SideEffect(tmp_path / "ran")}, tmp_path / "meta.pt")
    with pytest.raises(ConfigError, match="not unpickled"):
        load_meta(tmp_path / "meta.pt")
    assert not (tmp_path / "ran").exists()
    torch.load(tmp_path / "meta.pt", weights_only=False)  # the payload is real: unpickled without the guard, it runs
    assert (tmp_path / "ran").exists()


def save_one(path, value: float) -> None:
    save(path, {"model.w": torch.full((3,), value)}, {}, {"step": value}, is_global_zero=True)


def test_a_save_killed_before_its_rename_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    save_one(folder / "step000001.ckpt", 1.0)

    def killed(tmp, path):
        raise KeyboardInterrupt  # the process dies here: its files are written, the rename never happens

    monkeypatch.setattr(dcp_module, "publish", killed)
    with pytest.raises(KeyboardInterrupt):
        save_one(folder / "step000002.ckpt", 2.0)
    assert (folder / "step000002.ckpt.tmp" / "meta.pt").is_file() and not (folder / "step000002.ckpt").exists()
    assert latest_checkpoint(folder) == folder / "step000001.ckpt"
    assert load_meta(folder / "step000001.ckpt" / "meta.pt") == {"step": 1.0}
    monkeypatch.undo()
    save_one(folder / "step000002.ckpt", 3.0)  # the next save clears the torn folder and publishes
    assert not (folder / "step000002.ckpt.tmp").exists() and latest_checkpoint(folder) == folder / "step000002.ckpt"


def test_publish_replaces_an_existing_folder_whole(tmp_path):
    save_one(tmp_path / "last", 1.0)
    (tmp_path / "last" / "stale.distcp").write_bytes(b"old")  # a file only the old checkpoint had
    save_one(tmp_path / "last", 2.0)
    assert load_meta(tmp_path / "last" / "meta.pt") == {"step": 2.0}
    assert not (tmp_path / "last" / "stale.distcp").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
