"""The one Plan (save/load, validation, uniform split, settings it was made under), make_plan on the published
configs, and the omnibal-plan CLI."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import torch

from omnibal_pl.errors import ConfigError, PlanError
from omnibal_pl.model import VLM
from omnibal_pl.model.block import TransformerBlock
from omnibal_pl.model.config import TRANSFORMER_BLOCK_PREFIXES
from omnibal_pl.plan import Plan, make_plan, uniform_plan

from tests.helpers import model_config as load

ROOT = Path(__file__).resolve().parents[2]
PRESETS = ["tiny", "internvl_100m", "internvl2_2b", "internvl2_8b", "internvl_chat_v1_5", "llava_1_5_7b"]


def small_plan(**changes) -> Plan:
    fields = dict(model="tiny", stages=(("vision.embed", "vision.blocks.0"), ("vision.blocks.1", "projector", "llm.embed"),
                                        ("llm.layers.0", "llm.layers.1", "llm.head")),
                  recompute={"vision.blocks.0": "full", "llm.layers.1": "attention"}, schedule="1f1b", pp=3,
                  micro_batches=4, vit_cap=4, token_cap=128, predicted_step_s=0.01, stage_memory_bytes=(1e6, 2e6, 3e6),
                  source="profile")
    fields.update(changes)
    return Plan(**fields)


def test_save_load_round_trip(tmp_path) -> None:
    plan = small_plan()
    plan.save(tmp_path / "plan.yaml")
    loaded = Plan.load(tmp_path / "plan.yaml")
    assert loaded == plan
    assert loaded.mode("vision.blocks.0") == "full" and loaded.mode("llm.head") == "none"
    plan.check_model(load("tiny"))


@pytest.mark.parametrize("name", PRESETS)
def test_block_names_from_the_config_are_the_built_model_s(name) -> None:
    cfg = load(name)
    with torch.device("meta"):
        blocks = VLM(cfg).blocks()
    assert cfg.block_names() == [n for n, _ in blocks]
    transformer = {n for n, b in blocks if isinstance(b, TransformerBlock)}
    assert transformer == {n for n in cfg.block_names() if n.startswith(TRANSFORMER_BLOCK_PREFIXES)}


@pytest.mark.parametrize("changes,message", [
    ({"stages": (("vision.embed",), ())}, "every stage needs at least one block"),
    ({"pp": 2}, "do not divide evenly over pp=2"),
    ({"recompute": {"llm.head": "attention"}}, "no attention core"),
    ({"micro_batches": 2}, "1F1B needs at least as many micro-batches per step as stages: 2 < 3"),
    ({"schedule": "interleaved", "pp": 3, "micro_batches": 4}, "multiple of pp"),
    ({"vit_cap": 0}, "vit_cap=0 must be an integer >= 1"),
    ({"recompute": {"llm.layers.0": "half"}}, "not among"),
    ({"recompute": {"llm.layers.7": "full"}}, "no stage holds"),
    ({"schedule": "zb"}, "schedule 'zb'"),
    ({"stage_memory_bytes": (1.0,)}, "1 stage_memory_bytes for 3 stages"),
    ({"stages": (("vision.embed",), ("vision.embed",), ("llm.head",))}, "more than once"),
])
def test_bad_plans_are_refused(changes, message) -> None:
    with pytest.raises(PlanError, match=message):
        small_plan(**changes)


def test_full_recompute_is_allowed_on_any_block() -> None:
    assert small_plan(recompute={"projector": "full", "llm.head": "full"}).mode("projector") == "full"


def test_plan_whose_names_do_not_match_the_model() -> None:
    names = load("tiny")
    with pytest.raises(PlanError, match=r"missing from the plan \['llm.layers.1'\].*does not have \['llm.layers.9'\]"):
        small_plan(stages=(("vision.embed", "vision.blocks.0"), ("vision.blocks.1", "projector", "llm.embed"),
                           ("llm.layers.0", "llm.layers.9", "llm.head")), recompute={}).check_model(names)
    with pytest.raises(PlanError, match="out of order: position 3 holds 'llm.embed'"):
        small_plan(stages=(("vision.embed", "vision.blocks.0"), ("vision.blocks.1", "llm.embed", "projector"),
                           ("llm.layers.0", "llm.layers.1", "llm.head"))).check_model(names)


def test_load_reports_bad_files(tmp_path) -> None:
    path = tmp_path / "plan.yaml"
    with pytest.raises(PlanError, match="cannot read the plan"):
        Plan.load(path)
    data = small_plan().to_dict()
    del data["pp"]
    data["colour"] = "blue"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(PlanError, match=r"unknown keys \['colour'\], missing keys \['pp'\]"):
        Plan.load(path)
    data = small_plan().to_dict()
    data["micro_batches"] = 0
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(PlanError, match=f"{path}.*micro_batches=0"):
        Plan.load(path)


@pytest.mark.parametrize("name,pp", [("internvl_chat_v1_5", 4), ("internvl2_8b", 2), ("llava_1_5_7b", 4)])
def test_make_plan_for_published_models_without_hardware(name: str, pp: int) -> None:
    cfg = load(name)
    plan = make_plan(cfg, pp, 8, 18, 5280, dp=8, zero=1)
    plan.check_model(cfg)
    assert len(plan.stages) == pp and plan.source == "cost_model" and plan.predicted_step_s > 0
    assert max(plan.stage_memory_bytes) <= plan.memory_budget_bytes
    assert plan.memory_budget_bytes == pytest.approx(0.9 * 81559 * 2**20)


def test_make_plan_interleaved_and_errors() -> None:
    cfg = load("internvl2_8b")
    plan = make_plan(cfg, 2, 8, 18, 5280, dp=8, zero=1, schedule="interleaved")
    assert len(plan.stages) == 4 and plan.virtual_stages == 2
    with pytest.raises(PlanError, match="pp=") as err:  # a 26B model on 2 ranks with unsharded Adam
        make_plan(load("internvl_chat_v1_5"), 2, 8, 18, 5280)
    assert "stage" in str(err.value) and "budget" in str(err.value)
    with pytest.raises(ConfigError, match="source"):
        make_plan(cfg, 2, 8, 18, 5280, source="guess")


def test_dynamic_llava_plan_costs_more_to_train() -> None:
    off = load("llava_1_5_7b")
    on = dataclasses.replace(off, sparsify=dataclasses.replace(off.sparsify, enabled=True))
    step = {c.sparsify.enabled: make_plan(c, 4, 8, 4, 2800, dp=8, zero=1).predicted_step_s for c in (off, on)}
    assert step[True] > step[False]


def test_cli_writes_a_valid_plan_for_the_tiny_model_from_a_cpu_profile(tmp_path) -> None:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "omnibal_pl.cli.plan", "model=tiny", "plan.source=profile", "cluster.device=local",
           "cluster.pp=2", "balance.micro_batches=4", "plan.threads=1", f"plan.profile_cache={tmp_path / 'cache'}",
           "balance.vit_cap=4", "balance.token_cap=128", f"hydra.run.dir={run_dir}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    for row in ("searched (adaptive recompute)", "uniform + full recompute", "parameters + full recompute",
                "torchtitan + full recompute", "searched + recompute everything", "searched + none where it fits"):
        assert row in out.stdout
    plan = Plan.load(run_dir / "plan.yaml")
    plan.check_model(load("tiny"))
    assert plan.source == "profile" and plan.pp == 2 and plan.vit_cap == 4 and plan.token_cap == 128
    assert (run_dir / "gantt.png").read_bytes()[:4] == b"\x89PNG"
    assert list((tmp_path / "cache").glob("tiny-cpu-*.json"))

    for override, message in (("cluster.pp=5", "1F1B needs at least as many micro-batches per step as stages: 4 < 5"),
                              ("+foo=1", "unknown top-level keys ['foo']")):
        bad = subprocess.run([*cmd[:-1], override, f"hydra.run.dir={tmp_path / 'bad'}"], cwd=ROOT,
                             capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr


def test_uniform_plan_splits_block_counts_evenly() -> None:
    cfg = load("tiny")  # 8 blocks -> 3, 3, 2
    plan = uniform_plan(cfg, 3, 4, vit_cap=8, token_cap=64)
    assert [n for stage in plan.stages for n in stage] == cfg.block_names()
    assert [len(s) for s in plan.stages] == [3, 3, 2] and plan.recompute == {} and plan.source == "uniform"
    plan.check_model(cfg)
    interleaved = uniform_plan(cfg, 2, 4, vit_cap=8, token_cap=64, schedule="interleaved", virtual_stages=2)
    assert [len(s) for s in interleaved.stages] == [2, 2, 2, 2] and interleaved.stages_of_rank(1) == [1, 3]
    with pytest.raises(PlanError, match="cannot split 8 blocks into 9"):
        uniform_plan(cfg, 9, 9, vit_cap=8, token_cap=64)


def test_check_run_names_every_setting_the_plan_was_not_made_for() -> None:
    plan = small_plan(dp=8)
    plan.check_run(pp=3, dp=8, vit_cap=4, token_cap=128)
    with pytest.raises(PlanError) as err:
        plan.check_run(pp=3, dp=2, vit_cap=4, token_cap=256, micro_batches=4)
    assert "dp: plan 8, run 2" in str(err.value) and "token_cap: plan 128, run 256" in str(err.value)
    assert "pp:" not in str(err.value) and "micro_batches" not in str(err.value)


def test_zero_levels_decide_what_fits_and_are_recorded() -> None:
    """InternVL-Chat-V1.5 (26B) on 4 x H100 stages: replicated state does not fit, sharding over dp=8 does,
    and each level holds less per stage than the one below it."""
    cfg = load("internvl_chat_v1_5")
    with pytest.raises(PlanError, match="fits in memory"):
        make_plan(cfg, 4, 8, 18, 5280, dp=8, zero=0)
    peaks = {}
    for zero in (1, 2, 3):
        plan = make_plan(cfg, 4, 8, 18, 5280, dp=8, zero=zero)
        assert plan.zero == zero and plan.dp == 8
        peaks[zero] = max(plan.stage_memory_bytes)
    assert peaks[1] > peaks[3] and peaks[2] > peaks[3]


def test_a_plan_records_its_precision_and_a_run_in_another_refuses_it(tmp_path) -> None:
    """The memory a plan models depends on the precision (bytes per parameter and activation): plan.yaml
    records it and a run in another precision fails at start naming it."""
    from omnibal_pl.plan.make import plan_from_partition, planning_inputs
    from omnibal_pl.plan.partition import search_partition
    from omnibal_pl.train.assemble import resolve_run
    from omnibal_pl.train.schemas import parse_run_config
    from tests.helpers import FAST, cfg_of

    cfg = load("tiny")
    inputs = planning_inputs(cfg, 2, 4, 20, 256, device="local", source="profile", samples=2,
                             profile_cache=str(tmp_path / "profiles"), precision="bf16")
    plan = plan_from_partition(cfg, inputs, search_partition(inputs.profile, inputs.config))
    assert plan.precision == "bf16-mixed" and Plan.load(plan.save(tmp_path / "p.yaml")).precision == "bf16-mixed"
    run = cfg_of(*FAST, "cluster=cpu_pp2", f"plan.use={tmp_path / 'p.yaml'}", "balance.vit_cap=20",
                 "balance.token_cap=256")
    with pytest.raises(PlanError, match="precision: plan 'bf16-mixed', run '32-true'"):
        resolve_run(parse_run_config(run), tmp_path / "run")
