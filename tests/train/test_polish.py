"""What every run shows: a progress bar over optimizer steps, a mid-epoch resume that Lightning knows is exact
(the training loader's stateful protocol), and throughput in the summary whatever log_every_n_steps is."""
from __future__ import annotations

import re
import warnings

import torch

from omnibal_pl.cli.train import train
from omnibal_pl.data.datamodule import ResumableDataLoader
from omnibal_pl.train.assemble import build_run, resolve_run
from omnibal_pl.train.schemas import parse_run_config

from tests.helpers import FAST, cfg_of

QUIET = [o for o in FAST if not o.startswith("trainer.enable_progress_bar")]


def test_the_progress_bar_counts_optimizer_steps(tmp_path, capsys):
    train(cfg_of(*QUIET, "trainer.max_steps=3", "trainer.enable_progress_bar=true", "balance.micro_batches=2",
                 f"run_dir={tmp_path}"))
    out = capsys.readouterr().out  # Lightning's tqdm bars write to stdout
    counts = re.findall(r"steps: *\d+%\|[^|]*\| (\d+)/(\d+)", out)
    assert counts and counts[-1] == ("3", "3"), out[-2000:]  # 3 steps of 2 micro-batches each, not 6 items
    assert all(total == "3" for _, total in counts) and "Epoch" not in out


def test_a_mid_epoch_resume_goes_through_the_loader_protocol(tmp_path):
    common = [*FAST, "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2", "balance.micro_batches=2"]
    train(cfg_of(*common, f"run_dir={tmp_path / 'a'}"))
    ckpt = tmp_path / "a" / "checkpoints" / "step000002.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    (loader_state,) = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state["sampler"]["batches_done"] == 4  # 2 steps x 2 micro-batches
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg_of(*common, f"ckpt_path={ckpt}", f"run_dir={tmp_path / 'b'}"))
    assert not [w for w in caught if "not resumable" in str(w.message)]

    # the protocol alone (no DataModule restore) resumes a fresh loader at the recorded micro-batch
    _, _, datamodule = build_run(resolve_run(parse_run_config(cfg_of(*common)), tmp_path / "c"))
    datamodule.setup("fit")
    everything = [b.sample_ids.tolist() for b in datamodule.train_dataloader()]
    _, _, fresh = build_run(resolve_run(parse_run_config(cfg_of(*common)), tmp_path / "d"))
    loader = fresh.train_dataloader()
    assert isinstance(loader, ResumableDataLoader)
    loader.load_state_dict(loader_state)
    assert [b.sample_ids.tolist() for b in loader] == everything[4:]


def test_throughput_is_reported_when_no_step_was_logged(tmp_path):
    summary = train(cfg_of(*FAST, "trainer.max_steps=3", "trainer.log_every_n_steps=10", f"run_dir={tmp_path}"))
    for key in ("tokens_per_s", "samples_per_s", "tiles_per_s"):
        assert summary[key] > 0, key
    assert summary["mfu"] != summary["mfu"]  # NaN: no cluster.peak_tflops, as documented
