"""LoRA (``model/adapter=lora``): what trains, what the update computes, merging, loading and checkpoints."""
import copy

import pytest
import torch

from omnibal_pl.errors import ConfigError
from omnibal_pl.model import VLM, VLMConfig, dummy_batch
from omnibal_pl.model.config import AdapterConfig
from omnibal_pl.model.hf_loading import load_hf_weights, to_hf_state_dict
from omnibal_pl.model.lora import LoRALinear, is_adapter_param, merge_lora, trainable_state_dict

from tests.helpers import internvl_model, model_config, train_on, write_internvl_checkpoint


def lora_cfg(**knobs) -> VLMConfig:
    base = model_config("tiny").to_dict()
    base["attention_backend"] = "sdpa"
    base["adapter"] = {"kind": "lora", "r": 4, "alpha": 8.0, **knobs}
    return VLMConfig.from_dict(base)


def lora_model(seed: int = 0, **knobs) -> VLM:
    torch.manual_seed(seed)
    return VLM(lora_cfg(**knobs))


def randomise_adapters(model: VLM) -> None:
    """Non-zero B (fresh adapters compute nothing), so merging and scaling mistakes show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(std=0.05)


def test_targets_are_wrapped_and_everything_else_is_frozen():
    model = lora_model(trainable=["projector.*"])
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == sorted(f"llm.layers.{i}.{part}" for i in range(2)
                             for part in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"))
    trained = sorted(trainable_state_dict(model))
    assert trained == sorted([f"{n}.{ab}" for n in wrapped for ab in ("lora_a", "lora_b")]
                             + [n for n, _ in model.named_parameters() if n.startswith("projector.")])
    # the base parameters keep their names: the same set as the model without adapters, plus the adapters
    plain = {n for n, _ in VLM(model_config("tiny")).named_parameters()}
    assert {n for n, _ in model.named_parameters() if not is_adapter_param(n)} == plain
    a = model.llm.layers["0"].attn.q.lora_a
    assert a.shape == (4, model.cfg.llm.hidden) and model.llm.layers["0"].attn.q.scale == 2.0


def test_the_same_seed_gives_the_same_base_weights_and_fresh_adapters_change_nothing():
    torch.manual_seed(0)
    base = VLM(lora_cfg(kind="none")).eval()
    adapted = lora_model(seed=0).eval()
    state = dict(adapted.named_parameters())
    for name, p in base.named_parameters():
        torch.testing.assert_close(state[name], p, rtol=0, atol=0)
    batch = dummy_batch(base.cfg, [7, 5], [1, 2], token_cap=32, vit_cap=4, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(adapted(batch), base(batch), rtol=0, atol=0)


def test_vision_targets_and_patterns_that_match_nothing():
    model = lora_model(targets=["vision.blocks.*.attn.qkv", "llm.layers.1.mlp.down"])
    assert sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear)) == [
        "llm.layers.1.mlp.down", "vision.blocks.0.attn.qkv", "vision.blocks.1.attn.qkv"]
    with pytest.raises(ConfigError, match=r"adapter.targets \['llm.layers.\*.attn.qq'\] match no linear layer"):
        lora_model(targets=["llm.layers.*.attn.q", "llm.layers.*.attn.qq"])
    with pytest.raises(ConfigError, match=r"adapter.trainable \['projectr.\*'\]"):
        lora_model(trainable=["projectr.*"])
    with pytest.raises(ConfigError, match="adapter.r"):
        AdapterConfig(kind="lora", r=0)


def test_update_is_scaled_low_rank_product():
    """y = x W^T + b + (alpha / r) x A^T B^T, checked against the formula on one layer."""
    model = lora_model(alpha=12.0)
    randomise_adapters(model)
    layer = model.vision.blocks["0"].mlp.fc1  # not targeted: wrap one with a bias by hand
    lora = LoRALinear.wrap(layer, r=4, scale=3.0, dropout=0.0)
    assert lora.weight is layer.weight and lora.bias is layer.bias
    with torch.no_grad():
        lora.lora_b.normal_()
    x = torch.randn(3, layer.in_features)
    expected = x @ layer.weight.T + layer.bias + 3.0 * (x @ lora.lora_a.T @ lora.lora_b.T)
    torch.testing.assert_close(lora(x), expected)


def test_training_changes_only_adapter_parameters_and_the_loss_falls():
    model = lora_model(dropout=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = dummy_batch(model.cfg, [20, 14], [1, 2], token_cap=48, vit_cap=4, seed=2)
    losses = train_on(model, batch, 40, weight_decay=0.0)
    assert losses[-1] < losses[0] - 1.0, losses
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (name.endswith("lora_b") or name.endswith("lora_a")), name
        assert p.grad is None or is_adapter_param(name), f"{name} got a gradient though frozen"


def test_merged_model_computes_what_the_adapted_one_does():
    model = lora_model(dropout=0.1, trainable=["projector.*"]).eval()
    randomise_adapters(model)
    batch = dummy_batch(model.cfg, [9, 11], [2, 1], token_cap=32, vit_cap=4, seed=3)
    with torch.no_grad():
        expected = model(batch)
        merged = merge_lora(copy.deepcopy(model))
        got = merged(batch)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert merged.cfg.adapter.kind == "none"
    plain = {n for n, _ in VLM(model_config("tiny")).named_parameters()}
    assert {n for n, _ in merged.named_parameters()} == plain
    # the merged weights are the base weights plus a real change (the update did not vanish)
    delta = merged.llm.layers["0"].mlp.up.weight - model.llm.layers["0"].mlp.up.weight
    torch.testing.assert_close(delta, 2.0 * model.llm.layers["0"].mlp.up.lora_b @ model.llm.layers["0"].mlp.up.lora_a)


def test_hf_weights_load_under_the_adapters_and_a_merged_model_exports(tmp_path):
    source = internvl_model("Qwen2ForCausalLM")
    layout = write_internvl_checkpoint(source, tmp_path, "Qwen2ForCausalLM")
    data = source.cfg.to_dict()
    data["adapter"] = {"kind": "lora", "r": 2, "alpha": 4.0}
    torch.manual_seed(5)
    model = VLM(VLMConfig.from_dict(data))
    load_hf_weights(model, tmp_path, layout)
    assert sorted(trainable_state_dict(model)) == sorted(n for n, _ in model.named_parameters() if is_adapter_param(n))
    batch = dummy_batch(source.cfg, [6, 9], [1, 2], token_cap=64, vit_cap=4)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch), source(batch))  # fresh adapters: the checkpoint's outputs
    randomise_adapters(model)
    exported = to_hf_state_dict(merge_lora(model), layout)
    assert exported.keys() == to_hf_state_dict(source, layout).keys()


def test_a_data_parallel_checkpoint_holds_only_trained_parameters_and_resumes_exactly(tmp_path):
    from omnibal_pl.cli.train import train

    from tests.helpers import FAST, cfg_of, losses_in

    common = [*FAST, "model/adapter=lora", "model.attention_backend=sdpa", "model.adapter.dropout=0.0",
              "model.adapter.trainable=[projector.*]", "optim.lr=1e-3", "trainer.max_steps=8",
              "trainer.checkpoint_every_n_steps=4"]
    train(cfg_of(*common, f"run_dir={tmp_path / 'full'}"))
    ckpt = tmp_path / "full" / "checkpoints" / "step000004.ckpt"
    checkpoint = torch.load(ckpt, weights_only=False)
    saved = checkpoint["state_dict"]
    model = VLM(VLMConfig.from_dict(checkpoint["hyper_parameters"]["model"]))
    assert sorted(saved) == sorted(f"model.{n}" for n in trainable_state_dict(model))
    assert any(k.startswith("model.projector.") for k in saved) and any(k.endswith("lora_b") for k in saved)
    train(cfg_of(*common, f"ckpt_path={ckpt}", f"run_dir={tmp_path / 'resumed'}"))
    full, resumed = losses_in(tmp_path / "full"), losses_in(tmp_path / "resumed")
    assert sorted(resumed) == list(range(4, 8))
    for step, loss in resumed.items():
        assert loss == pytest.approx(full[step], rel=1e-5, abs=1e-6)


def _train(run_dir, *overrides: str) -> None:
    import subprocess
    import sys

    from tests.helpers import FAST

    out = subprocess.run([sys.executable, "-m", "omnibal_pl.cli.train", "model/adapter=lora", "plan.use=uniform",
                          "optim.lr=2e-2", "optim.warmup_ratio=0.0", "trainer.max_steps=8",
                          "trainer.checkpoint_every_n_steps=4", f"run_dir={run_dir}", *FAST, *overrides],
                         capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]


# pp2: stage 0 (vision, projector) has nothing to train; zero1: the AdamW state of the adapters partitioned;
# zero3: FSDP2 units that mix frozen weights and adapters.
@pytest.mark.distributed
@pytest.mark.timeout(600)
@pytest.mark.parametrize("cluster, resumes", [
    (["cluster=cpu_pp2"], True),
    *((["cluster.devices=2", "cluster.strategy=omnibal", "cluster.pp=1", f"cluster.zero={zero}", "balance.micro_batches=2"],
       True) for zero in (1, 3)),
], ids=["pp2", "zero1", "zero3"])
def test_distributed_runs_train_only_the_adapters(tmp_path, cluster, resumes):
    import json

    import yaml
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from omnibal_pl.parallel.stage import initial_state_dict
    from omnibal_pl.train.trained_model import read_trained_model
    from tests.helpers import losses_in

    _train(tmp_path / "full", *cluster)
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["loss_end"] < summary["loss_start"] - 0.1, summary
    dcp_to_torch_save(tmp_path / "full" / "checkpoints" / "last.ckpt", tmp_path / "last.pt")
    state = torch.load(tmp_path / "last.pt", weights_only=False)["state_dict"]
    state = {k.removeprefix("model."): v for k, v in state.items()}
    cfg = VLMConfig.from_dict(yaml.safe_load((tmp_path / "full" / "config.yaml").read_text())["model"])
    initial = initial_state_dict(cfg, seed=0)
    adapters = {name for name in initial if is_adapter_param(name)}
    assert state.keys() == adapters  # the checkpoint holds what trains, from every stage, and nothing frozen
    for name in adapters:  # lora_a moves too: B's first update gives it a gradient from step 1
        assert not torch.equal(state[name], initial[name]), name
    merged = read_trained_model(tmp_path / "full" / "checkpoints" / "last.ckpt").build()
    base = merge_lora(_with_state(cfg, {**initial, **state}))
    for name, value in base.state_dict().items():  # the frozen weights rebuilt as the run built them
        torch.testing.assert_close(merged.state_dict()[name], value, rtol=0, atol=0, msg=name)
    if resumes:
        _train(tmp_path / "resumed", *cluster, f"ckpt_path={tmp_path / 'full' / 'checkpoints' / 'step000004.ckpt'}")
        full, resumed = losses_in(tmp_path / "full"), losses_in(tmp_path / "resumed")
        assert sorted(resumed) == list(range(4, 8))
        for step, loss in resumed.items():
            assert loss == pytest.approx(full[step], rel=1e-5, abs=1e-6)


def _with_state(cfg: VLMConfig, state: dict) -> VLM:
    model = VLM(cfg)
    model.load_state_dict(state)
    return model


def test_dynamic_llava_predictors_train_beside_the_adapters():
    from tests.helpers import SMALL_PREDICTOR

    data = lora_cfg().to_dict()
    data["sparsify"] = {"enabled": True, **SMALL_PREDICTOR}
    torch.manual_seed(0)
    model = VLM(VLMConfig.from_dict(data))
    trained = trainable_state_dict(model)
    predictors = [n for n, _ in model.named_parameters() if ".sparsifier." in n]
    assert predictors and set(predictors) <= set(trained)
    assert set(trained) == set(predictors) | {n for n in trained if is_adapter_param(n)}


def test_training_flops_count_a_backward_through_the_adapted_parts_only():
    """LoRA on the LLM: vision and projector forward only (1x), the LLM forward and the gradient through it
    (2x), no weight gradients; the projector trained in full makes it 3x and the LLM's input gradient reach it."""
    from omnibal_pl.model.flops import part_forward_flops, train_flops

    seqlens, tiles = [40, 30], 6
    fwd = {part: part_forward_flops(lora_cfg(), part, tiles, seqlens) for part in ("vision", "projector", "llm")}
    assert train_flops(lora_cfg(), tiles, seqlens) == fwd["vision"] + fwd["projector"] + 2 * fwd["llm"]
    cfg = lora_cfg(trainable=["projector.*"])
    assert train_flops(cfg, tiles, seqlens) == fwd["vision"] + 3 * fwd["projector"] + 2 * fwd["llm"]
    cfg = lora_cfg(targets=["vision.blocks.*.attn.qkv"])
    assert train_flops(cfg, tiles, seqlens) == 2 * fwd["vision"] + 2 * fwd["projector"] + 2 * fwd["llm"]
