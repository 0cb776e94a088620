"""Dynamic-LLaVA in omnibal-train: the model/sparsify group composes with any model (the default one with no
other override) and the experiment (image samples, token-mean loss), the tiny model trains end to end with it
(keep-rate loss logged, predictors in their own groups), and dataset.require_image keeps the image samples."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from omnibal_pl.balance import BalanceConfig
from omnibal_pl.cli.train import train
from omnibal_pl.conf import preset
from omnibal_pl.data.training_data import ModelSpec, prepare_training_data
from omnibal_pl.errors import ConfigError
from omnibal_pl.model.sparsify import SparsifyConfig, sparse_layer_for
from omnibal_pl.train.module import OmniBalModule
from omnibal_pl.train.schemas import parse_run_config as parse

from tests.helpers import FAST, LLAVA_TILING, cfg_of, llava_dataset_node, make_tokenizer, write_json

ROOT = Path(__file__).resolve().parents[2]
# the tiny model has short synthetic answers: small predictors, answers from 4 tokens sparsified
SPARSE_TINY = ["model/sparsify=dynamic_llava", "model.sparsify.predictor_dim=32",
               "model.sparsify.predictor_heads=4", "model.sparsify.predictor_mlp_dim=64",
               "model.sparsify.output_text_len_for_training=4"]


def test_sparsify_group_composes_with_any_model_and_the_experiment():
    assert parse(cfg_of()).model.sparsify == SparsifyConfig(sparse_layer=1)  # the tiny model has 2 layers
    assert parse(cfg_of("model=internvl2_2b", "model/sparsify=dynamic_llava")).model.sparsify == SparsifyConfig(enabled=True)
    assert parse(cfg_of("model/sparsify=dynamic_llava")).model.sparsify == SparsifyConfig(enabled=True, sparse_layer=1)
    assert [sparse_layer_for(n) for n in (1, 2, 3, 32, None)] == [0, 1, 2, 2, 2]
    exp = parse(cfg_of("experiment=dynamic_llava_7b"))
    assert exp.model.name == "llava_1_5_7b" and exp.model.sparsify == SparsifyConfig(enabled=True)
    assert exp.optim.lr == 5e-6 and exp.optim.freeze == ["vision"] and exp.trainer.max_epochs == 1
    assert exp.cluster.devices == 8 and exp.dataset["_target_"] == "omnibal_pl.data.LlavaDataset"
    assert exp.dataset["require_image"] is True and exp.packing.loss_weighting == "token"  # as the original
    assert exp.balance.micro_batches * exp.balance.samples_per_group * exp.cluster.devices == 64  # the global batch
    with pytest.raises(ConfigError, match="sparse_layer"):  # an explicit layer the LLM lacks still fails
        parse(cfg_of("model/sparsify=dynamic_llava", "model.sparsify.sparse_layer=2"))
    # every knob of the dataclass is exposed in both options
    knobs = set(SparsifyConfig.__dataclass_fields__)
    for option in ("off", "dynamic_llava"):
        assert set(preset("model/sparsify", option)) == knobs


def test_omnibal_train_runs_the_tiny_model_sparsified(tmp_path):
    overrides = [*FAST, *SPARSE_TINY, "trainer.max_steps=6", "optim.lr=1e-3", "model.sparsify.predictor_lr=3e-3",
                 f"run_dir={tmp_path}"]
    summary = train(cfg_of(*overrides))
    assert summary["steps"] == 6 and math.isfinite(summary["loss_end"])
    with open(tmp_path / "metrics.csv") as f:
        keep_loss = [float(r["train/keep_rate_loss"]) for r in csv.DictReader(f) if r.get("train/keep_rate_loss")]
    assert len(keep_loss) == 6 and all(math.isfinite(v) and v > 0 for v in keep_loss), keep_loss

    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    lrs = {g["name"]: g["initial_lr"] for g in ckpt["optimizer_states"][0]["param_groups"]}
    assert lrs["predictors"] == lrs["predictors_no_decay"] == 3e-3 and lrs["llm"] == 1e-3
    run = parse(cfg_of(*overrides))
    init = OmniBalModule(run.model, run.optim, seed=run.seed).state_dict()
    predictors = [n for n in init if ".sparsifier." in n and n.endswith("weight")]
    assert predictors and all(not torch.equal(init[n], ckpt["state_dict"][n]) for n in predictors)


@pytest.mark.distributed
@pytest.mark.timeout(420)
def test_two_process_ddp_trains_sparsified_when_no_answer_is_long_enough(tmp_path):
    """Every answer is shorter than output_text_len_for_training: the output-text predictor decides nothing
    on either rank, yet DDP's reducer must not wait for its gradient (it hung before)."""
    out = subprocess.run([sys.executable, "-m", "omnibal_pl.cli.train", "cluster.devices=2", "cluster.strategy=ddp",
                          *FAST, *SPARSE_TINY, "model.sparsify.output_text_len_for_training=100000",
                          "trainer.max_steps=3", f"hydra.run.dir={tmp_path}"],
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 3


def test_the_option_runs_on_the_default_model_with_no_other_override(tmp_path):
    summary = train(cfg_of(*FAST, "model/sparsify=dynamic_llava", "trainer.max_steps=2", f"run_dir={tmp_path}"))
    assert summary["steps"] == 2 and math.isfinite(summary["loss_end"])


SPEC = ModelSpec(vocab_size=100, image_size=8, tokens_per_tile=4, image_context_id=3)


def test_require_image_keeps_only_image_samples_synthetic(tmp_path):
    """dataset.require_image (Dynamic-LLaVA's data): the caps are searched on, and the run sees, only samples
    with an image. Bug caught: the filter ignored (text-only samples trained)."""
    rows = [{"vit_num": 1 + k % 3, "token_num": 40 + 7 * k, "image_flags": 0 if k % 4 == 0 else 1 + k % 3}
            for k in range(40)]
    stats = write_json(tmp_path / "lengths.json", rows)  # every 4th sample text-only (one dummy tile)
    synthetic = {"name": "synthetic", "kind": "synthetic", "paths": [str(stats)], "text_scale": 0.1}
    balance = BalanceConfig(dp=1, samples_per_group=4)
    every = prepare_training_data(synthetic, balance, SPEC)
    images = prepare_training_data({**synthetic, "require_image": True}, balance, SPEC)
    with_image = int((every.lengths.image_flag > 0).sum())
    assert 0 < with_image < len(every.lengths) and len(images.lengths) == len(images.dataset) == with_image
    assert (images.lengths.image_flag > 0).all()
    assert all(int(images.dataset[i].image_flags.sum()) > 0 for i in range(0, with_image, 7))


def test_require_image_keeps_only_image_samples_real(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    # one of llava_records' 7 samples is text-only
    cfg = llava_dataset_node(root, make_tokenizer(tmp_path / "tok"), require_image=True)
    spec = ModelSpec(vocab_size=64, image_size=LLAVA_TILING.image_size, tokens_per_tile=9, image_context_id=8)
    data = prepare_training_data(cfg, BalanceConfig(dp=1, vit_cap=4, token_cap=200), spec)
    assert len(data.dataset) == len(data.lengths) == 6 and (data.lengths.image_flag > 0).all()
    assert all(int(data.dataset[i].image_flags.sum()) > 0 for i in range(6))
