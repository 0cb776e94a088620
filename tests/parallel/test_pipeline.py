"""Pipeline x data parallel steps in real gloo processes equal a single-process run on the same data.

Each test spawns its ranks with ``torch.multiprocessing`` (file rendezvous under ``tmp_path``); rank
results come back as ``torch.save`` files. The reference is ``torch.manual_seed(0); VLM(cfg)`` trained
on all of the step's micro-batches at once with the mean micro-batch loss.
"""
from __future__ import annotations

import datetime
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.optim import ZeroRedundancyOptimizer

from omnibal_pl.conf import preset
from omnibal_pl.errors import ConfigError, DataError, PlanError
from omnibal_pl.model import VLM, VLMConfig, dummy_batch
from omnibal_pl.parallel import all_reduce_grads, build_mesh, build_pipeline, gather_full_state_dict, initial_state_dict
from omnibal_pl.parallel.dcp import state_holder
from omnibal_pl.parallel.sharding import local_tensor

from tests.helpers import RecomputeCounter, plan_of, run_ranks

pytestmark = pytest.mark.distributed

STEPS = 3
MAX_NORM = 0.1  # small enough that every step clips
LR = 0.5  # SGD with momentum: linear in the gradients, so fp32 differences stay fp32-sized


def tiny(tied: bool = False) -> VLMConfig:
    data = preset("model", "tiny")
    data["llm"]["tie_embeddings"] = tied
    return VLMConfig.from_dict(data)


def packed_loss(logits: torch.Tensor, batch) -> torch.Tensor:
    """Weighted next-token cross entropy of one packed micro-batch."""
    labels, weight = batch.labels[0, 1:], batch.loss_weight[0, 1:]
    ce = F.cross_entropy(logits[0, :-1].float(), labels.clamp(min=0), reduction="none")
    return (ce * weight).sum() / weight.sum().clamp(min=1)


def step_batches(cfg: VLMConfig, step: int, count: int, tokens: int = 48, tiles: int = 3) -> list:
    """``count`` micro-batches of step ``step``, all padded to ``tokens`` tokens and ``tiles`` tiles."""
    out = []
    for k in range(count):
        seed = 100 * step + k
        gen = torch.Generator().manual_seed(seed)
        n = 1 + k % 3
        text = torch.randint(2, 9, (n,), generator=gen).tolist()
        image = [(seed + i) % 2 for i in range(n)]
        out.append(dummy_batch(cfg, text, image, token_cap=tokens, vit_cap=tiles, seed=seed))
    return out


def reference_run(cfg: VLMConfig, count: int) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """Losses, pre-clip gradient norms and final parameters of the single-process run on ``count`` micro-batches per step."""
    torch.manual_seed(0)
    model = VLM(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    losses, norms = [], []
    for step in range(STEPS):
        opt.zero_grad()
        batches = step_batches(cfg, step, count)
        loss = torch.stack([packed_loss(model(b), b) for b in batches]).mean()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        opt.step()
        losses.append(float(loss.detach()))
    return losses, norms, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _entry(rank: int, world: int, tmp: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        torch.save(fn(*args), f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, tmp_path: Path, *args) -> list:
    """Run ``fn(*args)`` on ``world`` gloo ranks; the list of their return values, by rank."""
    def attempt(k: int) -> tuple:
        folder = tmp_path / f"attempt{k}"  # a fresh rendezvous file for each attempt
        folder.mkdir(parents=True)
        return world, str(folder), fn, args

    _, folder, _, _ = run_ranks(_entry, world, attempt)
    return [torch.load(Path(folder) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def train_worker(pp: int, schedule: str, stages: list[list[str]], recompute: dict[str, str], m: int,
                 tied: bool = False, zero: int = 0) -> dict:
    """Three steps of ``m`` micro-batches per DP replica; counts recomputation during step 2; the bytes this
    rank holds at the end in parameters, gradients and optimizer state."""
    cfg = tiny(tied)
    mesh, dims = build_mesh(pp)
    plan = plan_of(cfg, stages, recompute, pp=pp, micro_batches=m, schedule=schedule, dp=dims.dp, zero=zero,
                   vit_cap=3, token_cap=48)
    runner = build_pipeline(cfg, plan, mesh, initial_state_dict(cfg, 0), packed_loss)
    params = list(runner.parameters())
    if zero == 1:  # what the training module builds at ZeRO 1: the optimizer state partitioned over "dp"
        opt = ZeroRedundancyOptimizer(params, torch.optim.SGD, process_group=runner.dp_group, lr=LR, momentum=0.9)
    else:
        opt = torch.optim.SGD(params, lr=LR, momentum=0.9)
    counter = RecomputeCounter(runner.modules)
    losses, norms, counts = [], [], None
    for step in range(STEPS):
        counter.reset()  # step 0 also runs the schedule's shape inference: count on step 1
        opt.zero_grad()
        batches = step_batches(cfg, step, dims.dp * m)
        mine = batches[dims.dp_rank * m:(dims.dp_rank + 1) * m]
        losses.append(float(runner.train_step(mine)))
        norms.append(float(runner.clip_grad_norm_(MAX_NORM)))
        opt.step()
        if step == 1:
            counts = {k: dict(v) for k, v in counter.counts.items()}
    held = [p for p in params] + [p.grad for p in params if p.grad is not None] + \
        [v for p in params for v in state_holder(opt).state.get(p, {}).values() if isinstance(v, torch.Tensor)]
    state_bytes = sum(local_tensor(t).numel() * t.element_size() for t in held)
    state = gather_full_state_dict(runner.modules, runner.pp_group)
    return {"losses": losses, "norms": norms, "counts": counts, "state": state, "dims": dims, "bytes": state_bytes}


def check_against_reference(results: list[dict], count: int, tied: bool = False) -> None:
    ref_losses, ref_norms, ref_state = reference_run(tiny(tied), count)
    for r in results:
        torch.testing.assert_close(r["losses"], ref_losses, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["norms"], ref_norms, rtol=1e-5, atol=1e-5)
        assert min(r["norms"]) > MAX_NORM  # clipping was exercised
        assert sorted(r["state"]) == sorted(ref_state)
        for k, v in ref_state.items():
            torch.testing.assert_close(r["state"][k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    moved = max(float((ref_state[k] - v).abs().max()) for k, v in initial_state_dict(tiny(), 0).items())
    assert moved > 1e-3  # the three steps changed the parameters far beyond the tolerance


NAMES = tiny().block_names()
RECOMPUTE = {"vision.blocks.0": "full", "vision.blocks.1": "attention", "llm.layers.0": "attention",
             "llm.layers.1": "full", "llm.head": "full"}


@pytest.mark.timeout(360)
def test_pp2_1f1b_matches_single_process_and_recomputes_per_plan(tmp_path):
    stages = [NAMES[:4], NAMES[4:]]
    m = 4
    results = spawn(train_worker, 2, tmp_path, 2, "1f1b", stages, RECOMPUTE, m)
    check_against_reference(results, count=m)
    counts = {**results[0]["counts"], **results[1]["counts"]}
    expected = {"none": (m, m, m), "full": (m, 2 * m, 2 * m), "attention": (m, m, 2 * m)}
    for name in ("vision.blocks.0", "vision.blocks.1", "llm.layers.0", "llm.layers.1"):
        c = counts[name]
        assert (c["forward"], c["mlp"], c["core"]) == expected[RECOMPUTE[name]], (name, c)


@pytest.mark.timeout(360)
@pytest.mark.parametrize("schedule, stages", [
    ("gpipe", [NAMES[:3], NAMES[3:]]),
    ("interleaved", [NAMES[:2], NAMES[2:4], NAMES[4:6], NAMES[6:]]),  # 2 stages per rank
])
def test_pp2_other_schedules_match_single_process(tmp_path, schedule, stages):
    results = spawn(train_worker, 2, tmp_path, 2, schedule, stages, {}, 4)
    check_against_reference(results, count=4)


@pytest.mark.timeout(360)
def test_pp2_tied_embedding_across_ranks_matches_single_process(tmp_path):
    """llm.embed on rank 0, llm.head on rank 1: two copies whose gradients are summed each step."""
    results = spawn(train_worker, 2, tmp_path, 2, "1f1b", [NAMES[:5], NAMES[5:]], {}, 2, True)
    check_against_reference(results, count=2, tied=True)
    for r in results:
        torch.testing.assert_close(r["state"]["llm.head.out.weight"], r["state"]["llm.embed.tok.weight"],
                                   rtol=0, atol=0)


@pytest.mark.timeout(540)
def test_pp2_dp2_matches_single_process(tmp_path):
    results = spawn(train_worker, 4, tmp_path, 2, "1f1b", [NAMES[:5], NAMES[5:]], {"llm.layers.0": "full"}, 2)
    assert sorted((r["dims"].pp_rank, r["dims"].dp_rank) for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    check_against_reference(results, count=4)  # 2 replicas x 2 micro-batches


@pytest.mark.timeout(540)
def test_dp2_zero_levels_match_single_process_and_shard_the_state(tmp_path):
    """Loss, pre-clip gradient norm and parameters after 3 steps equal one process at every level; at ZeRO 2
    and 3 each rank holds about half the parameter + gradient + optimizer bytes of ZeRO 0, at 1 less."""
    held = {}
    for zero in (0, 1, 2, 3):
        results = spawn(train_worker, 2, tmp_path / f"z{zero}", 1, "1f1b", [NAMES], {"llm.layers.0": "full"}, 2,
                        False, zero)
        check_against_reference(results, count=4)  # 2 replicas x 2 micro-batches
        held[zero] = max(r["bytes"] for r in results)
    assert held[2] <= 0.53 * held[0] and held[3] <= 0.53 * held[0], held
    # ZeRO 1 halves only the momentum: 4 + 4 + 4 / 2 bytes of 12 per parameter (uneven partitions aside)
    assert 0.75 * held[0] <= held[1] <= 0.9 * held[0], held


@pytest.mark.timeout(540)
def test_pp2_dp2_zero3_matches_single_process(tmp_path):
    results = spawn(train_worker, 4, tmp_path, 2, "1f1b", [NAMES[:5], NAMES[5:]], {"llm.layers.0": "full"}, 2, False, 3)
    check_against_reference(results, count=4)


def bad_input_worker() -> dict:
    """Errors every rank must raise alike, without hanging the others."""
    cfg = tiny()
    errors = {}
    try:
        build_mesh(2, dp=2)
    except ConfigError as e:
        errors["world"] = str(e)
    mesh, _ = build_mesh(2)
    stages, full = [NAMES[:4], NAMES[4:]], initial_state_dict(cfg, 0)
    try:
        plan_of(cfg, stages, micro_batches=1, vit_cap=3, token_cap=48)
    except PlanError as e:
        errors["1f1b"] = str(e)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_pipeline(cfg, plan_of(cfg, stages, micro_batches=1, schedule="gpipe", vit_cap=3, token_cap=48), mesh,
                       full, packed_loss)
    errors["bubble"] = " ".join(str(w.message) for w in caught)
    try:
        build_pipeline(cfg, plan_of(cfg, stages, dp=2, vit_cap=3, token_cap=48), mesh, full, packed_loss)
    except PlanError as e:
        errors["dp"] = str(e)
    runner = build_pipeline(cfg, plan_of(cfg, stages, micro_batches=2, vit_cap=3, token_cap=48), mesh, full, packed_loss)
    runner.train_step(step_batches(cfg, 0, 2))
    try:
        runner.train_step(step_batches(cfg, 1, 2, tokens=64))
    except DataError as e:
        errors["tokens"] = str(e)
    try:
        runner.train_step(step_batches(cfg, 1, 2, tiles=4))
    except DataError as e:
        errors["tiles"] = str(e)
    runner.train_step(step_batches(cfg, 2, 2))  # still in step after refusing bad input
    return errors


@pytest.mark.timeout(360)
def test_bad_sizes_and_micro_batch_shapes_are_clear_errors(tmp_path):
    for errors in spawn(bad_input_worker, 2, tmp_path):
        assert "pp=2 x dp=2 = 4 processes, but the world has 2" in errors["world"]
        assert "1F1B needs at least as many micro-batches per step as stages: 1 < 2" in errors["1f1b"]
        assert "1 micro-batches for 2 pipeline stages" in errors["bubble"]
        assert "dp: plan 2, run 1" in errors["dp"]
        assert "has 64 tokens" in errors["tokens"] and "token cap" in errors["tokens"]
        assert "has 4 tiles" in errors["tiles"] and "tile cap" in errors["tiles"]


def grad_sync_worker(bucket_bytes: int) -> dict:
    """Rank r's gradients are r + 1 everywhere; records every all-reduce's element count."""
    rank = dist.get_rank()
    params = [torch.nn.Parameter(torch.zeros(n, dtype=dtype)) for n, dtype in
              ((10, torch.float32), (3, torch.float32), (40, torch.float32), (6, torch.bfloat16), (5, torch.float32))]
    for p in params[:3] + params[3:4]:
        p.grad = torch.full_like(p, rank + 1.0)
    frozen = torch.nn.Parameter(torch.zeros(4), requires_grad=False)
    sizes = []
    original = dist.all_reduce

    def recording(tensor, *args, **kwargs):
        sizes.append((tensor.numel(), tensor.dtype))
        return original(tensor, *args, **kwargs)

    dist.all_reduce = recording
    try:
        all_reduce_grads([*params, frozen], dist.group.WORLD, bucket_bytes=bucket_bytes)
    finally:
        dist.all_reduce = original
    return {"grads": [p.grad.float().tolist() for p in params], "frozen": frozen.grad, "sizes": sizes}


def test_gradient_sync_averages_in_buckets_and_skips_frozen_parameters(tmp_path) -> None:
    """Gradients are the mean over DP (a sum would double them), a trainable parameter without a gradient
    joins with zeros, a frozen one is not communicated, and no all-reduce copies more than one bucket
    (or one gradient larger than a bucket)."""
    ranks = spawn(grad_sync_worker, 2, tmp_path, 64)  # 64 bytes: 16 fp32 elements per bucket
    for out in ranks:
        assert [g[0] for g in out["grads"]] == [1.5, 1.5, 1.5, 1.5, 0.0]
        assert out["frozen"] is None
    # fp32 in order 10, 3 | 40 (alone: larger than a bucket) | 5 (no grad: zeros); bf16: 6
    assert ranks[0]["sizes"] == [(13, torch.float32), (40, torch.float32), (5, torch.float32), (6, torch.bfloat16)]
