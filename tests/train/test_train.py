"""omnibal-train: Hydra composition and errors, the main job's artifacts, overfitting, exact resume,
loss normalisation invariant to DP size and accumulation, a sweep, and a 2-process DDP run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from omnibal_pl.cli.train import train
from omnibal_pl.data.collate import PackingCollate
from omnibal_pl.data.synthetic import SyntheticDataset
from omnibal_pl.data.synthetic_lengths import adapt_to_model, synthetic_lengths
from omnibal_pl.errors import ConfigError
from omnibal_pl.train.module import OmniBalModule
from omnibal_pl.train.optim import OptimConfig
from omnibal_pl.train.schemas import parse_run_config as parse

from tests.helpers import FAST, CollectiveDevices, cfg_of, internvl_model, losses_in, model_config, write_internvl_checkpoint

def test_composition_and_schemas():
    run = parse(cfg_of("model=internvl2_2b", "cluster=gpu8", "balance=isf", "optim.freeze=[vision]"))
    assert run.model.name == "internvl2_2b" and run.cluster.devices == 8 and run.cluster.strategy == "ddp"
    assert run.cluster.precision == "bf16-mixed" and run.balance.algorithm == "isf" and run.optim.freeze == ["vision"]
    slurm = cfg_of("cluster=slurm", hydra_node=True)
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher") and slurm.cluster.devices == 8


@pytest.mark.parametrize("override, message", [
    ("optim.lr=fast", "optim.lr"),
    ("cluster.devices=two", "cluster.devices"),
    ("balance.algorithm=magic", "choose one of"),
    ("optim.freeze=[eyes]", "optim.freeze"),
    ("model.llm.layers=-1", "layers"),
])
def test_bad_values_fail_at_start(override, message):
    with pytest.raises(ConfigError, match=message):
        parse(cfg_of(override))


def test_mistyped_key_is_rejected_by_the_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "omnibal_pl.cli.train", "trainer.max_stepz=3",
                          f"run_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "max_stepz" in out.stderr


def test_main_job_writes_its_artifacts_and_learns(tmp_path):
    summary = train(cfg_of(*FAST, "trainer.max_steps=60", "trainer.checkpoint_every_n_steps=30", "optim.lr=1e-3",
                           f"run_dir={tmp_path}"))
    for name in ("config.yaml", "metrics.csv", "balance_report.json", "balance.png", "loss.png", "summary.json",
                 "checkpoints/last.ckpt", "memory_report.json"):
        assert (tmp_path / name).is_file(), name
    assert summary["steps"] == 60 and summary["loss_end"] < summary["loss_start"] - 0.3
    assert summary["vit_dist_ratio"] == 0.0 and summary["tokens_per_s"] > 0
    assert json.loads((tmp_path / "balance_report.json").read_text())["samples_lost"] == 0


def test_tiny_model_overfits_a_small_fixed_set(tmp_path):
    summary = train(cfg_of(*FAST, "dataset.generator.samples=24", "balance.samples_per_group=2", "trainer.max_steps=150",
                           "optim.lr=3e-3", "optim.warmup_ratio=0.0", f"run_dir={tmp_path}"))
    assert summary["loss_end"] < 0.5 * summary["loss_start"]


def test_resume_reproduces_the_uninterrupted_loss_curve_and_summarises_the_whole_run(tmp_path):
    common = [*FAST, "trainer.max_steps=16", "trainer.checkpoint_every_n_steps=7"]
    full_summary = train(cfg_of(*common, f"run_dir={tmp_path / 'full'}"))
    full = losses_in(tmp_path / "full")
    # the step-7 checkpoint is what a run killed after step 7 leaves (same schedule length, unlike max_steps=7)
    ckpt = tmp_path / "full" / "checkpoints" / "step000007.ckpt"
    summary = train(cfg_of(*common, f"ckpt_path={ckpt}", f"run_dir={tmp_path / 'resumed'}"))
    resumed = losses_in(tmp_path / "resumed")
    assert sorted(resumed) == list(range(7, 16))
    for step, loss in resumed.items():
        assert loss == pytest.approx(full[step], rel=1e-5, abs=1e-6)
    # the summary is the run's, not the last attempt's: 16 steps, the first attempt's starting loss
    assert (full_summary["attempts"], full_summary["resumed_at"]) == (1, [])
    assert (summary["steps"], summary["attempts"], summary["resumed_at"]) == (16, 2, [7])
    assert summary["loss_start"] == pytest.approx(full_summary["loss_start"], rel=1e-5)
    assert summary["loss_end"] == pytest.approx(full_summary["loss_end"], rel=1e-5)
    assert summary["run_seconds"] > summary["seconds"]


def test_sweep_over_two_algorithms(tmp_path):
    out = subprocess.run([sys.executable, "-m", "omnibal_pl.cli.train", "-m", f"hydra.sweep.dir={tmp_path}",
                          "balance.algorithm=balanced,random", "trainer.max_steps=3", *FAST],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    algorithms = sorted(json.loads(p.read_text())["algorithm"] for p in tmp_path.glob("*/summary.json"))
    assert algorithms == ["balanced", "random"]


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_two_process_ddp_run(tmp_path):
    out = subprocess.run([sys.executable, "-m", "omnibal_pl.cli.train", "cluster.devices=2", "cluster.strategy=ddp",
                          "trainer.max_steps=4", f"hydra.run.dir={tmp_path}", *FAST],
                         capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 4
    report = json.loads((tmp_path / "balance_report.json").read_text())
    assert report["dp_size"] == 2 and report["samples_lost"] == 0


# ---------------------------------------------------------------- loss normalisation invariance

TINY = model_config("tiny")


def fixed_groups(n_groups: int = 4) -> list:
    table = adapt_to_model(synthetic_lengths(n_groups * 3, seed=5), TINY.tokens_per_tile, 0.2)
    ds = SyntheticDataset(table, TINY.llm.vocab_size, TINY.vision.image_size, TINY.tokens_per_tile,
                          TINY.image_context_id, seed=1)
    return [[ds[3 * g + k] for k in range(3)] for g in range(n_groups)]


class FixedData(L.LightningDataModule):
    """Each rank gets its share of the given groups, packed with sample weighting (the hard case)."""

    def __init__(self, groups: list, world: int) -> None:
        super().__init__()
        self.groups, self.world = groups, world
        self.collate = PackingCollate(token_cap=1024, vit_cap=64, loss_weighting="sample")

    def train_dataloader(self):
        rank = self.trainer.global_rank
        share = self.groups[rank * len(self.groups) // self.world:(rank + 1) * len(self.groups) // self.world]
        return torch.utils.data.DataLoader(share, batch_size=None, collate_fn=self.collate)


class GradRecorder(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0 and trainer.is_global_zero:
            grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
            torch.save({"grads": grads, "loss": pl_module.losses[-1]}, pl_module.record_path)


class RecordViolations(CollectiveDevices):
    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        if trainer.is_global_zero:
            torch.save(self.violations, pl_module.record_path.with_suffix(".violations"))


def one_step(groups: list, world: int, accumulate: int, path: Path) -> dict:
    module = OmniBalModule(TINY, OptimConfig(lr=0.0, warmup_ratio=0.0))
    module.record_path = path
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy="ddp_spawn" if world > 1 else "auto",
                        max_steps=1, accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[GradRecorder(), RecordViolations()])
    trainer.fit(module, datamodule=FixedData(groups, world))
    assert not torch.load(path.with_suffix(".violations")), "a collective got a tensor made without a device"
    return torch.load(path)


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_loss_and_gradients_do_not_depend_on_dp_size_or_accumulation(tmp_path):
    groups = fixed_groups(4)
    merged = [[s for g in groups for s in g]]  # the same samples as one micro-batch
    ref = one_step(merged, world=1, accumulate=1, path=tmp_path / "ref.pt")
    for world, accumulate in ((1, 4), (2, 2)):
        got = one_step(groups, world, accumulate, tmp_path / f"w{world}a{accumulate}.pt")
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        for name, g in ref["grads"].items():
            torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-7, msg=name)


def test_init_from_a_hugging_face_checkpoint(tmp_path):
    source = internvl_model("Qwen2ForCausalLM")
    write_internvl_checkpoint(source, tmp_path, "Qwen2ForCausalLM")
    module = OmniBalModule(source.cfg, init_from=str(tmp_path))
    for name, p in source.named_parameters():
        torch.testing.assert_close(module.model.get_parameter(name), p, rtol=0, atol=0, msg=name)


def test_experiment_dynamic_llava_composes():
    run = parse(cfg_of("experiment=dynamic_llava_7b", "dataset.annotation=a.json", "dataset.tokenizer=tok"))
    assert run.model.name == "llava_1_5_7b" and run.model.sparsify.enabled
    assert run.optim.lr == 5e-6 and run.optim.freeze == ["vision"] and run.cluster.devices == 8
