"""OmniBalStrategy through Lightning's Trainer in real gloo processes, against a single-process run.

Each rank is a process started with ``torch.multiprocessing`` and Lightning's environment variables
(as torchrun would), so the Trainer finds its rank; every rank builds its own Trainer, DataModule and
module. The reference is :class:`OmniBalModule` in one process on the union of the DP replicas'
micro-batches of each step (taken from the same DataModule with an explicit DP rank).
"""
from __future__ import annotations

import json
import os
import re
import socket
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from omnibal_pl.balance.config import BalanceConfig
from omnibal_pl.data.datamodule import OmniBalDataModule, PackingConfig
from omnibal_pl.data.training_data import ModelSpec
from omnibal_pl.errors import ConfigError, DataError, PlanError
from omnibal_pl.parallel import OmniBalStrategy, gather_full_state_dict
from omnibal_pl.plan import Plan
from omnibal_pl.train.assemble import resolve_run
from omnibal_pl.train.module import OmniBalModule
from omnibal_pl.train.optim import OptimConfig
from omnibal_pl.train.pipeline_module import OmniBalPipelineModule
from omnibal_pl.train.schemas import parse_run_config
from tests.helpers import CollectiveDevices, RecomputeCounter, cfg_of, model_config, plan_of, run_ranks

pytestmark = pytest.mark.distributed

CFG = model_config("tiny")
NAMES = CFG.block_names()
DATASET = {"name": "synthetic_small", "kind": "synthetic", "generator": {"samples": 240}, "text_scale": 0.25}
OPTIM = OptimConfig(lr=1e-3, warmup_ratio=0.0, eps=1e-6)
CLIP = 0.5


def balance(m: int, dp: int) -> BalanceConfig:
    return BalanceConfig(dp=dp, micro_batches=m, samples_per_group=2, vit_cap=6, token_cap=96)


def datamodule(m: int, dp: int, dp_rank: int | None = None, whole_steps: bool = False) -> OmniBalDataModule:
    spec = ModelSpec(CFG.llm.vocab_size, CFG.vision.image_size, CFG.tokens_per_tile, CFG.image_context_id)
    return OmniBalDataModule.from_config(DATASET, balance(m, dp), spec, PackingConfig(pad_to="cap", loss_weighting="square"),
                                         whole_steps=whole_steps, dp_rank=dp_rank)


def trainer(steps: int, m: int, strategy, callbacks=(), root: Path | None = None) -> L.Trainer:
    """The reference's Trainer (one process, Lightning accumulation and clipping) or a pipeline rank's (the
    pipeline module steps and clips itself)."""
    pipelined = strategy != "auto"
    return L.Trainer(accelerator="cpu", devices=strategy.pp * (strategy.dp or 1) if pipelined else 1,
                     strategy=strategy, max_steps=steps, accumulate_grad_batches=1 if pipelined else m,
                     gradient_clip_val=None if pipelined else CLIP,
                     logger=False, enable_checkpointing=bool(callbacks and root), callbacks=list(callbacks),
                     enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                     num_sanity_val_steps=2, default_root_dir=root)


class StepCounts(L.Callback):
    """Recomputation counts per transformer block during optimizer step 1 (step 0 includes shape inference);
    a pipeline loader item is one whole step."""

    def __init__(self) -> None:
        self.counter, self.counts = None, None

    def on_train_start(self, trainer, pl_module) -> None:
        self.counter = RecomputeCounter(pl_module.stages)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 1:
            self.counter.reset()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 1:
            self.counts = {k: dict(v) for k, v in self.counter.counts.items()}


def pipeline_fit(pp: int, dp: int, m: int, steps: int, stages, recompute=None, schedule: str = "1f1b",
                 root: str | None = None, every: int = 0, resume: str | None = None, zero: int = 0) -> dict:
    """One rank of a pipeline run; returns its losses, the full final state, recompute counts."""
    plan = plan_of(CFG, stages, recompute, pp=pp, micro_batches=m, schedule=schedule, dp=dp, zero=zero, vit_cap=6,
                   token_cap=96)
    strategy = OmniBalStrategy(plan, dp=dp)
    counts, devices = StepCounts(), CollectiveDevices()
    callbacks = [counts, devices]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=Path(root) / "ckpt", every_n_train_steps=every, save_top_k=-1,
                                         filename="step{step}", auto_insert_metric_name=False))
    module = OmniBalPipelineModule(CFG, OPTIM, seed=0, gradient_clip_val=CLIP)
    t = trainer(steps, m, strategy, callbacks, Path(root) if root else None)
    t.fit(module, datamodule=datamodule(m, dp, whole_steps=True), ckpt_path=resume)
    state = gather_full_state_dict(module.runner.modules, module.runner.pp_group)
    return {"losses": module.losses, "grad_norms": module.grad_norms, "state": state, "counts": counts.counts,
            "dims": strategy.dims, "global_step": t.global_step, "collective_violations": devices.violations}


def _entry(rank: int, world: int, port: int, out: str, fn, kwargs) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0",
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    try:
        result = fn(**kwargs)
    except Exception as e:  # every rank reports its error instead of hanging the test
        result = {"error": e}
    torch.save(result, f"{out}/rank{rank}.pt")
    if torch.distributed.is_initialized():  # a run that failed in setup leaves its groups: close them before exit
        torch.distributed.destroy_process_group()


def spawn(fn, world: int, tmp_path: Path, **kwargs) -> list[dict]:
    def attempt(_: int) -> tuple:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = tmp_path / f"out{port}"
        out.mkdir()
        return world, port, str(out), fn, kwargs

    _, _, out, _, _ = run_ranks(_entry, world, attempt)
    return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def reference(m: int, dp: int, steps: int) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """OmniBalModule in this process on every DP replica's micro-batches of each step, replica by replica."""
    loaders = []
    for r in range(dp):
        dm = datamodule(m, dp, dp_rank=r)
        dm.setup("fit")
        loaders.append(iter(dm.train_dataloader()))
    batches = [b for _ in range(steps) for it in loaders for b in (next(it) for _ in range(m))]
    module = OmniBalModule(CFG, OPTIM, seed=0)
    t = trainer(steps, m * dp, "auto")
    t.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b))
    return module.losses, module.grad_norms, {k.removeprefix("model."): v for k, v in module.state_dict().items()}


def check_equal(results: list[dict], ref_losses: list[float], ref_norms: list[float],
                ref_state: dict[str, torch.Tensor]) -> None:
    """Losses, gradient norms before clipping (a DP reduction that sums instead of averaging doubles them,
    which AdamW and clipping would hide from the parameters) and final parameters equal one process's."""
    for r in results:
        assert "error" not in r, r.get("error")
        assert not r["collective_violations"], r["collective_violations"]
        torch.testing.assert_close(r["losses"], ref_losses, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["grad_norms"], ref_norms, rtol=1e-4, atol=1e-6)
        assert sorted(r["state"]) == sorted(ref_state)
        for k, v in ref_state.items():
            torch.testing.assert_close(r["state"][k], v, rtol=1e-4, atol=1e-5, msg=lambda s, k=k: f"{k}: {s}")


RECOMPUTE = {"vision.blocks.0": "full", "vision.blocks.1": "attention", "llm.layers.0": "attention",
             "llm.layers.1": "none"}


@pytest.mark.timeout(420)
def test_pp2_matches_single_process_and_recomputes_per_plan(tmp_path):
    m, steps = 4, 3
    results = spawn(pipeline_fit, 2, tmp_path, pp=2, dp=1, m=m, steps=steps, stages=[NAMES[:4], NAMES[4:]],
                    recompute=RECOMPUTE)
    check_equal(results, *reference(m, 1, steps))
    counts = {**results[0]["counts"], **results[1]["counts"]}
    expected = {"none": (m, m, m), "full": (m, 2 * m, 2 * m), "attention": (m, m, 2 * m)}
    for name, mode in RECOMPUTE.items():
        c = counts[name]
        assert (c["forward"], c["mlp"], c["core"]) == expected[mode], (name, c)


@pytest.mark.timeout(420)
def test_pp2_dp2_matches_single_process(tmp_path):
    m, steps = 2, 3
    results = spawn(pipeline_fit, 4, tmp_path, pp=2, dp=2, m=m, steps=steps, stages=[NAMES[:5], NAMES[5:]])
    assert sorted((r["dims"].pp_rank, r["dims"].dp_rank) for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    check_equal(results, *reference(m, 2, steps))


A_STAGES = [NAMES[:4], NAMES[4:]]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """4 steps of PP=2 with a distributed checkpoint after step 2."""
    root = tmp_path_factory.mktemp("full")
    results = spawn(pipeline_fit, 2, root, pp=2, dp=1, m=2, steps=4, stages=A_STAGES, root=str(root), every=2)
    assert all("error" not in r for r in results), results
    return results[0], root / "ckpt" / "step2.ckpt"


def check_resumed(results: list[dict], full: dict) -> None:
    for r in results:
        assert "error" not in r, r.get("error")
        assert r["global_step"] == 4
        # steps 1-2 from the checkpoint's run record, 3-4 trained again: the whole run's
        torch.testing.assert_close(r["losses"], full["losses"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["grad_norms"], full["grad_norms"], rtol=1e-4, atol=1e-6)
        for k, v in full["state"].items():
            torch.testing.assert_close(r["state"][k], v, rtol=1e-4, atol=1e-5, msg=lambda s, k=k: f"{k}: {s}")


@pytest.mark.timeout(540)
@pytest.mark.parametrize("zero", [1, 3])
def test_dp2_zero_trains_like_one_process_and_resumes_exactly(tmp_path, zero):
    """ZeRO under Lightning: 1 partitions the AdamW state (ZeroRedundancyOptimizer), 3 shards parameters,
    gradients and state (FSDP2, clipping over shards); a distributed checkpoint resumes into the same run."""
    m, steps = 2, 4
    full = spawn(pipeline_fit, 2, tmp_path, pp=1, dp=2, m=m, steps=steps, stages=[NAMES], zero=zero,
                 root=str(tmp_path / "full"), every=2)
    check_equal(full, *reference(m, 2, steps))
    resumed = spawn(pipeline_fit, 2, tmp_path, pp=1, dp=2, m=m, steps=steps, stages=[NAMES], zero=zero,
                    resume=str(tmp_path / "full" / "ckpt" / "step2.ckpt"))
    check_resumed(resumed, full[0])


@pytest.mark.timeout(420)
def test_checkpoint_resume_reproduces_the_uninterrupted_run(full_run, tmp_path):
    full, ckpt = full_run
    assert (ckpt / ".metadata").is_file() and (ckpt / "meta.pt").is_file()
    assert len(full["losses"]) == 4
    check_resumed(spawn(pipeline_fit, 2, tmp_path, pp=2, dp=1, m=2, steps=4, stages=A_STAGES, resume=str(ckpt)), full)


@pytest.mark.timeout(420)
def test_checkpoint_loads_into_another_layout_and_pp_size(full_run, tmp_path):
    full, ckpt = full_run
    interleaved = [NAMES[:2], NAMES[2:5], NAMES[5:6], NAMES[6:]]  # 2 stages per rank, other cut points
    check_resumed(spawn(pipeline_fit, 2, tmp_path, pp=2, dp=1, m=2, steps=4, stages=interleaved,
                        schedule="interleaved", resume=str(ckpt)), full)
    check_resumed(spawn(pipeline_fit, 1, tmp_path, pp=1, dp=1, m=2, steps=4, stages=[NAMES], resume=str(ckpt)), full)


def bad_input_worker() -> dict:
    """Each bad input on 2 ranks; every rank must raise alike (no rank left waiting)."""
    errors = {}

    def attempt(key, *, dp=1, m=2, stages=A_STAGES, pad_to="cap", plan_dp=1, module=None):
        strategy = OmniBalStrategy(plan_of(CFG, stages, pp=2, micro_batches=m, dp=plan_dp, vit_cap=6, token_cap=96),
                                   dp=dp)
        t = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      use_distributed_sampler=False)
        dm = datamodule(m, 1, whole_steps=True)
        dm.packing = PackingConfig(pad_to=pad_to, multiple=16)
        try:
            t.fit(module or OmniBalPipelineModule(CFG, OPTIM), datamodule=dm)
            errors[key] = f"ran {[len(s) for s in strategy.plan.stages]}"
        except (ConfigError, PlanError, DataError, ValueError) as e:
            errors[key] = f"{type(e).__name__}: {e}"

    attempt("world", dp=2, plan_dp=2)
    attempt("plan_dp", plan_dp=2)
    attempt("missing_block", stages=[NAMES[:3], NAMES[4:]])
    attempt("automatic", module=OmniBalModule(CFG, OPTIM))
    attempt("shape", pad_to="multiple")
    return errors


def plan_agreement_worker() -> dict:
    """Ranks holding different plans: other stages for the same settings (a profile measured on each rank) are
    replaced by rank 0's; other settings fail on every rank."""
    rank, results = int(os.environ["LOCAL_RANK"]), {}
    for key, stages, vit_cap in (("other_stages", A_STAGES if rank == 0 else [NAMES[:5], NAMES[5:]], 6),
                                 ("other_caps", A_STAGES, 6 if rank == 0 else 8)):
        strategy = OmniBalStrategy(plan_of(CFG, stages, pp=2, micro_batches=2, vit_cap=vit_cap, token_cap=96))
        t = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      use_distributed_sampler=False)
        try:
            t.fit(OmniBalPipelineModule(CFG, OPTIM), datamodule=datamodule(2, 1, whole_steps=True))
            results[key] = f"ran {[len(s) for s in strategy.plan.stages]}"
        except (ConfigError, PlanError) as e:
            results[key] = f"{type(e).__name__}: {e}"
    return results


@pytest.mark.timeout(420)
def test_bad_inputs_are_clear_errors(tmp_path):
    for errors in spawn(bad_input_worker, 2, tmp_path):
        assert "error" not in errors, errors.get("error")
        assert "ConfigError: parallel sizes: pp=2 x dp=2 = 4 processes, but the world has 2" in errors["world"]
        assert "PlanError" in errors["plan_dp"] and "dp: plan 2, run 1" in errors["plan_dp"]
        assert "PlanError" in errors["missing_block"] and "missing from the plan ['projector']" in errors["missing_block"]
        assert "OmniBalStrategy trains an OmniBalPipelineModule" in errors["automatic"]
        # padded to a multiple only: whichever of the first micro-batch's dimensions is off the plan is named
        assert re.match(r"DataError: pipeline step: micro-batch 0 has \d+ (tokens|tiles), but pipeline stages run at "
                        r"a fixed \d+ \1 \(the plan's (token_cap|vit_cap)\)", errors["shape"]), errors["shape"]


@pytest.mark.timeout(420)
def test_every_rank_runs_rank_0s_plan(tmp_path):
    for results in spawn(plan_agreement_worker, 2, tmp_path):
        assert "error" not in results, results.get("error")
        assert results["other_stages"] == "ran [4, 4]"  # rank 1 adopted rank 0's stages
        assert "the plan of global rank 0" in results["other_caps"] and "vit_cap: plan 6, run" in results["other_caps"]


# ---------------------------------------------------------------- omnibal-train integration

def test_cli_pipeline_settings_fail_at_start(tmp_path):
    cases = [(["cluster.pp=2"], ConfigError, "cluster.strategy=omnibal"),
             (["cluster=cpu_pp2", "cluster.pp=3"], ConfigError, "pp x dp must equal the world size"),
             (["cluster=cpu_pp2", "cluster.dp=2"], ConfigError, "cluster.dp=2 but 2 processes / cluster.pp=2 give dp=1"),
             (["cluster=cpu_pp2", "cluster.devices=9", "cluster.pp=9", "cluster.schedule=gpipe"], ConfigError,
              "9 pipeline stages but the model has only 8 blocks"),
             (["cluster=cpu_pp2", "balance.micro_batches=1"], ConfigError, "1F1B needs at least as many micro-batches"),
             (["cluster=cpu_pp2", "packing.pad_to=multiple"], ConfigError, "packing.pad_to=cap")]
    plan = plan_of(CFG, [NAMES[:3], NAMES[4:]], micro_batches=4, vit_cap=20, token_cap=240)
    plan.save(tmp_path / "missing.yaml")
    cases.append(([f"plan.use={tmp_path / 'missing.yaml'}"], PlanError, "blocks missing from the plan \\['projector'\\]"))
    plan = plan_of(CFG, [NAMES[:4], NAMES[4:]], micro_batches=8, vit_cap=20, token_cap=999, dp=8)
    plan.save(tmp_path / "other.yaml")
    cases.append(([f"plan.use={tmp_path / 'other.yaml'}"], PlanError,
                  "dp: plan 8, run 1; micro_batches: plan 8, run 4; (vit_cap: plan 20, run [0-9]+; )?token_cap: plan 999, "
                  "run [0-9]+"))  # the run's own caps come from the search: vit_cap may happen to be 20
    for overrides, error, message in cases:
        overrides = overrides if overrides[0].startswith("cluster") else ["cluster=cpu_pp2", *overrides]
        with pytest.raises(error, match=message):
            resolve_run(parse_run_config(cfg_of(*overrides, "dataset.generator.samples=600")), tmp_path)


@pytest.mark.timeout(420)
def test_cli_plan_auto_trains_like_one_process(tmp_path):
    import csv
    import subprocess
    import sys

    common = ["trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "dataset.generator.samples=600",
              "trainer.max_steps=3", "balance.micro_batches=4"]
    runs = {"pp": ["cluster=cpu_pp2", "plan.use=auto"], "one": []}
    losses = {}
    for name, extra in runs.items():
        out = subprocess.run([sys.executable, "-m", "omnibal_pl.cli.train", *extra, *common,
                              f"hydra.run.dir={tmp_path / name}"], capture_output=True, text=True, timeout=170)
        assert out.returncode == 0, out.stderr[-3000:]
        with open(tmp_path / name / "metrics.csv") as f:
            losses[name] = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    for name, ranks in (("pp", 2), ("one", 1)):  # what each rank holds, measured, is what the model says
        report = json.loads((tmp_path / name / "memory_report.json").read_text())
        assert len(report["ranks"]) == ranks
        assert all(r["measured_static"] == r["predicted_static"] > 0 for r in report["ranks"]), report
        if name == "pp":  # the activation peak of a real step, against the plan's in-flight x profiled bytes
            for r in report["ranks"]:
                assert r["measured_activations"] == pytest.approx(r["predicted_activations"], rel=0.10), report
    plan = Plan.load(tmp_path / "pp" / "plan.yaml")
    assert plan.pp == 2 and plan.source == "profile" and plan.micro_batches == 4
    assert (tmp_path / "pp" / "checkpoints" / "last.ckpt" / ".metadata").is_file()
    assert len(losses["pp"]) == 3
    torch.testing.assert_close(losses["pp"], losses["one"], rtol=1e-5, atol=1e-6)
