"""Stage construction in one process: the stage's slice of a plan, recompute per plan, sizes."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from omnibal_pl.errors import ConfigError
from omnibal_pl.model import VLM, VLMConfig, dummy_batch
from omnibal_pl.parallel import build_stage, check_sizes, initial_state_dict, load_stage_state

from tests.helpers import model_config, plan_of


@pytest.fixture(scope="module")
def cfg() -> VLMConfig:
    return model_config("tiny")


@pytest.fixture(scope="module")
def names(cfg) -> list[str]:
    return cfg.block_names()


def test_initial_state_is_the_single_process_init_and_leaves_the_rng_alone(cfg):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    full = initial_state_dict(cfg, seed=7)
    assert torch.equal(torch.rand(3), before)
    torch.manual_seed(7)
    ref = VLM(cfg).state_dict()
    assert sorted(full) == sorted(ref) and all(torch.equal(full[k], ref[k]) for k in ref)


def test_stage_holds_only_its_blocks_with_model_names_and_exact_values(cfg, names):
    plan = plan_of(cfg, [names[:3], names[3:6], names[6:]])
    full = initial_state_dict(cfg, seed=0)
    owned = set()
    for s in range(3):
        stage = build_stage(cfg, plan, s, "cpu", full)
        assert stage.block_names == plan.stages[s]
        state = stage.model.state_dict()
        assert all(torch.equal(v, full[k]) for k, v in state.items())
        assert not any(p.is_meta for p in stage.parameters())
        assert not owned & set(state)
        owned |= set(state)
    assert owned == set(full)  # the stages partition the parameters


def test_stages_chained_compute_the_full_model(cfg, names):
    plan = plan_of(cfg, [names[:4], names[4:]])
    full = initial_state_dict(cfg, seed=0)
    torch.manual_seed(0)
    model = VLM(cfg)
    batch = dummy_batch(cfg, [5, 7], [1, 2], token_cap=40, vit_cap=3)
    x = batch.pixel_values
    for s in range(2):
        stage = build_stage(cfg, plan, s, "cpu", full)
        stage.micro_batches = [batch]
        x = stage(x, torch.tensor([0]))
    torch.testing.assert_close(x, model(batch), rtol=0, atol=0)


def test_recompute_follows_the_plan(cfg, names):
    recompute = {"vision.blocks.0": "full", "llm.layers.1": "attention", "projector": "full", "llm.head": "none"}
    plan = plan_of(cfg, [names[:4], names[4:]], recompute)
    full = initial_state_dict(cfg, seed=0)
    first, last = (build_stage(cfg, plan, s, "cpu", full) for s in range(2))
    modes = {n: b.recompute for st in (first, last) for n, b in st.model.blocks() if hasattr(b, "recompute")}
    assert modes == {"vision.blocks.0": "full", "vision.blocks.1": "none", "llm.layers.0": "none",
                     "llm.layers.1": "attention"}
    assert first.checkpointed == {"projector"} and last.checkpointed == frozenset()


def test_load_stage_state_names_missing_keys(cfg, names):
    full = initial_state_dict(cfg, seed=0)
    stage = build_stage(cfg, plan_of(cfg, [names]), 0, "cpu", full)
    del full["llm.layers.1.mlp.up.weight"]
    with pytest.raises(ConfigError, match=r"missing \['llm.layers.1.mlp.up.weight'\]"):
        load_stage_state(stage, full)


def test_tied_embeddings_share_one_parameter_on_one_stage_and_are_copies_across_stages(cfg, names):
    tied = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, tie_embeddings=True))
    full = initial_state_dict(tied, seed=0)
    stage = build_stage(tied, plan_of(tied, [names[:4], names[4:]]), 1, "cpu", full)
    assert stage.model.llm.head.out.weight is stage.model.llm.embed.tok.weight
    split = plan_of(tied, [names[:5], names[5:]])
    split.check_model(tied)
    embed, head = (build_stage(tied, split, s, "cpu", full) for s in range(2))
    assert torch.equal(embed.model.llm.embed.tok.weight, head.model.llm.head.out.weight)
    assert set(head.model.state_dict()) >= {"llm.head.out.weight"} and "llm.embed.tok.weight" not in head.model.state_dict()


def test_world_size_must_be_pp_times_dp():
    check_sizes(2, 2, 4)
    with pytest.raises(ConfigError, match="pp=2 x dp=3 = 6 processes, but the world has 4"):
        check_sizes(2, 3, 4)
