"""omnibal-export: train -> export -> transformers loads the folder and computes our logits; export -> init_from
round trip; a pipeline run's distributed checkpoint; the bad inputs (family, target, tokenizer, source)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from hydra import compose, initialize_config_module
from safetensors import safe_open

from omnibal_pl.cli.export import export
from omnibal_pl.cli.train import train
from omnibal_pl.errors import ConfigError
from omnibal_pl.model import dummy_batch
from omnibal_pl.model.hf_loading import load_hf_model
from omnibal_pl.train.module import OmniBalModule
from omnibal_pl.train.schemas import parse_run_config
from omnibal_pl.train.trained_model import read_trained_model

from tests.helpers import FAST, SMALL_PREDICTOR, cfg_of, internvl_model, make_tokenizer, write_internvl_checkpoint

transformers = pytest.importorskip("transformers")

IMAGE_TOKEN = 8  # "<image>" in make_tokenizer's vocabulary
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
TRAIN = [*FAST, "trainer.max_steps=3", "trainer.checkpoint_every_n_steps=3", "optim.lr=1e-2", "optim.warmup_ratio=0"]


def export_cfg(*overrides: str):
    with initialize_config_module(config_module="omnibal_pl.conf", version_base="1.3"):
        return compose(config_name="export", overrides=list(overrides))


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})
    return out


@pytest.fixture(scope="module")
def llava_source(tmp_path_factory) -> Path:
    """A tiny random LlavaForConditionalGeneration (features from the penultimate of 3 CLIP blocks, so one block and
    the post-layernorm are never built by us) with a tokenizer and a chat template."""
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=2, image_size=56, patch_size=14)
    text = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = transformers.LlavaForConditionalGeneration(config)
    with torch.no_grad():  # non-trivial norms and biases, so a mapping mistake shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "class_embedding" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("llava_source")
    model.save_pretrained(path, max_shard_size="100KB")
    make_tokenizer(path)
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def llava_checkpoint(tmp_path_factory, llava_source) -> Path:
    """3 steps of omnibal-train from the LLaVA folder (model=auto): a Lightning checkpoint."""
    run_dir = tmp_path_factory.mktemp("llava_run")
    train(cfg_of(*TRAIN, "model=auto", f"init_from={llava_source}", f"run_dir={run_dir}"))
    return run_dir / "checkpoints" / "last.ckpt"


def logits_of(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch)


@pytest.mark.parametrize("source", ["auto", "null"])
def test_llava_export_loads_in_transformers_and_computes_our_logits(tmp_path, llava_source, llava_checkpoint, source):
    target = tmp_path / "hf"
    result = export(export_cfg(f"checkpoint={llava_checkpoint}", f"target={target}", f"source={source}",
                               f"tokenizer={llava_source}", "max_shard_gb=0.0001"))
    assert len(result.weight_files) > 1 and (target / "model.safetensors.index.json").is_file()
    hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(target, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ours = read_trained_model(llava_checkpoint).build()
    batch = dummy_batch(ours.cfg, [21], [2], seed=4)  # one sample, two image tiles
    with torch.no_grad():
        theirs = hf.eval()(input_ids=batch.input_ids, pixel_values=batch.pixel_values).logits
    torch.testing.assert_close(theirs, logits_of(ours, batch), atol=1e-4, rtol=1e-4)
    # the trained weights were exported, not the source's
    exported, original = all_tensors(target), all_tensors(llava_source)
    assert not torch.equal(exported["language_model.lm_head.weight"], original["language_model.lm_head.weight"])
    if source == "auto":  # the block we never built and CLIP's post-layernorm come unchanged from the source
        assert json.loads((target / "config.json").read_text()) == json.loads((llava_source / "config.json").read_text())
        for key in ("vision_tower.encoder.layers.2.mlp.fc1.weight", "vision_tower.post_layernorm.bias"):
            torch.testing.assert_close(exported[key], original[key], rtol=0, atol=0)
    else:  # the tower as built: 2 blocks, features from the last
        vision = json.loads((target / "config.json").read_text())["vision_config"]
        assert vision["num_hidden_layers"] == 2 and "vision_tower.encoder.layers.2.mlp.fc1.weight" not in exported
    for name in ("tokenizer.json", "chat_template.jinja"):
        assert (target / name).read_bytes() == (llava_source / name).read_bytes()


def test_export_then_init_from_computes_identical_logits(tmp_path, llava_checkpoint):
    target = tmp_path / "hf"
    export(export_cfg(f"checkpoint={llava_checkpoint}", f"target={target}"))
    ours = read_trained_model(llava_checkpoint).build()
    again = load_hf_model(target).eval()
    batch = dummy_batch(ours.cfg, [9, 14], [1, 2], seed=5)
    torch.testing.assert_close(logits_of(again, batch), logits_of(ours, batch), rtol=0, atol=0)
    # and a run started from the export reads its architecture from it (model=auto)
    run = parse_run_config(cfg_of("model=auto", f"init_from={target}"))
    assert run.model.vision == ours.cfg.vision and run.model.llm == ours.cfg.llm


def test_a_lora_run_exports_with_its_adapters_merged(tmp_path, llava_source):
    """A LoRA run's checkpoint holds only the adapters: the export rebuilds the frozen weights from init_from, folds
    the trained updates in, and transformers computes the adapted model's logits."""
    run_dir = tmp_path / "run"
    train(cfg_of(*TRAIN, "model=auto", "model/adapter=lora", "model.adapter.dropout=0", f"init_from={llava_source}",
                 f"run_dir={run_dir}"))
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    trained = read_trained_model(checkpoint)
    assert trained.state and all("lora_" in k for k in trained.state)  # only the adapters were saved
    target = tmp_path / "hf"
    export(export_cfg(f"checkpoint={checkpoint}", f"target={target}"))
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(target).eval()
    ours = trained.build()
    batch = dummy_batch(ours.cfg, [21], [2], seed=4)
    with torch.no_grad():
        theirs = hf(input_ids=batch.input_ids, pixel_values=batch.pixel_values).logits
    torch.testing.assert_close(theirs, logits_of(ours, batch), atol=1e-4, rtol=1e-4)
    exported, original = all_tensors(target), all_tensors(llava_source)
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(exported[q], original[q])  # the adapter's update is in the weight
    for key in ("vision_tower.encoder.layers.0.mlp.fc1.weight", "language_model.lm_head.weight"):
        torch.testing.assert_close(exported[key], original[key], rtol=0, atol=0)  # frozen: the source's


def test_a_dynamic_llava_run_exports_its_predictors_under_the_original_names(tmp_path, llava_source):
    sparsify = ["model/sparsify=dynamic_llava", *(f"model.sparsify.{k}={v}" for k, v in SMALL_PREDICTOR.items())]
    run_dir = tmp_path / "run"
    train(cfg_of(*TRAIN, "model=auto", *sparsify, f"init_from={llava_source}", f"run_dir={run_dir}"))
    target = tmp_path / "hf"
    export(export_cfg(f"checkpoint={run_dir / 'checkpoints' / 'last.ckpt'}", f"target={target}"))
    trained = read_trained_model(run_dir / "checkpoints" / "last.ckpt").build()
    exported = all_tensors(target)
    original = {k for k in exported if k.startswith(("model.image_score_predictor.", "model.output_text_score_predictor."))}
    predictors = {n: p for n, p in trained.named_parameters() if ".sparsifier." in n}
    assert original and len(original) == len(predictors)
    _, info = transformers.LlavaForConditionalGeneration.from_pretrained(target, output_loading_info=True)
    assert not info["missing_keys"] and {k.removeprefix("model.") for k in info["unexpected_keys"]} == {
        k.removeprefix("model.") for k in original}  # transformers' LLaVA has no place for them; nothing else is off
    run = parse_run_config(cfg_of("model=auto", *sparsify, f"init_from={target}"))
    again = OmniBalModule(run.model, init_from=str(target)).model  # init_from a folder with predictors loads them
    for name, p in predictors.items():
        torch.testing.assert_close(again.get_parameter(name), p, rtol=0, atol=0, msg=name)
    fresh = OmniBalModule(run.model).model  # the same seed's untrained predictors: training moved them
    assert any(not torch.equal(fresh.get_parameter(n), p) for n, p in predictors.items())


@pytest.fixture(scope="module")
def internvl_source(tmp_path_factory) -> Path:
    """An InternVL-Chat folder (InternLM2 names, fused wqkv) with remote code and a tokenizer holding <IMG_CONTEXT>."""
    path = tmp_path_factory.mktemp("internvl_source")
    model = internvl_model("InternLM2ForCausalLM")
    write_internvl_checkpoint(model, path, "InternLM2ForCausalLM")
    (path / "added_tokens.json").unlink()
    make_tokenizer(path)  # <IMG_CONTEXT> has id 7, the model's image_context_id
    (path / "modeling_internvl_chat.py").write_text("# remote code of the published model\n")
    return path


def test_internvl_chat_export_keeps_the_remote_code_layout(tmp_path, internvl_source):
    run_dir = tmp_path / "run"
    train(cfg_of(*TRAIN, "model=auto", f"init_from={internvl_source}", f"run_dir={run_dir}"))
    target = tmp_path / "hf"
    export(export_cfg(f"checkpoint={run_dir / 'checkpoints' / 'last.ckpt'}", f"target={target}"))
    assert json.loads((target / "config.json").read_text()) == json.loads((internvl_source / "config.json").read_text())
    assert (target / "modeling_internvl_chat.py").is_file() and (target / "tokenizer.json").is_file()
    exported, original = all_tensors(target), all_tensors(internvl_source)
    assert exported.keys() == original.keys()  # InternLM2 names: wqkv, feed_forward.w1, output
    assert not torch.equal(exported["language_model.output.weight"], original["language_model.output.weight"])
    ours = read_trained_model(run_dir / "checkpoints" / "last.ckpt").build()
    batch = dummy_batch(ours.cfg, [6, 9], [1, 2], token_cap=64, vit_cap=4)
    torch.testing.assert_close(logits_of(load_hf_model(target).eval(), batch), logits_of(ours, batch), rtol=0, atol=0)


def test_internvl_exports_as_transformers_native_internvl(tmp_path):
    """family=internvl: transformers' InternVLForConditionalGeneration loads the folder with no missing or unexpected
    key and computes our logits; our loader reads it back (model=auto) with identical logits."""
    source = tmp_path / "source"
    source.mkdir()
    write_internvl_checkpoint(internvl_model("Qwen2ForCausalLM"), source, "Qwen2ForCausalLM")
    make_tokenizer(source)
    run_dir = tmp_path / "run"
    train(cfg_of(*TRAIN, "model=auto", f"init_from={source}", f"run_dir={run_dir}"))
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match="family=internvl, but source=.* is a internvl_chat folder; pass source=null"):
        export(export_cfg(f"checkpoint={checkpoint}", f"target={tmp_path / 'x'}", "family=internvl"))
    target = tmp_path / "hf"
    export(export_cfg(f"checkpoint={checkpoint}", f"target={target}", "family=internvl", "source=null",
                      f"tokenizer={source}"))
    hf, info = transformers.InternVLForConditionalGeneration.from_pretrained(target, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ours = read_trained_model(checkpoint).build()
    batch = dummy_batch(ours.cfg, [21], [2], seed=4)
    with torch.no_grad():
        theirs = hf.eval()(input_ids=batch.input_ids, pixel_values=batch.pixel_values).logits
    torch.testing.assert_close(theirs, logits_of(ours, batch), atol=1e-4, rtol=1e-4)
    again = load_hf_model(target).eval()
    assert again.cfg.vision == ours.cfg.vision and again.cfg.llm == ours.cfg.llm
    torch.testing.assert_close(logits_of(again, batch), logits_of(ours, batch), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(400)
@pytest.mark.parametrize("layout", [["cluster=cpu_pp2"],  # 2 pipeline stages, whole tensors per stage
                                    ["cluster.devices=2", "cluster.strategy=omnibal", "cluster.zero=3"]],  # FSDP2 shards
                         ids=["pp2", "dp2_zero3"])
def test_a_pipeline_runs_distributed_checkpoint_exports_whole(tmp_path, llava_source, layout):
    """2 processes with lr=0: the distributed checkpoint gathered into one process and exported must give back the
    source folder's tensors bit for bit (a stage's tensors lost or misnamed, or a shard missing, cannot)."""
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "omnibal_pl.cli.train", *layout, "plan.use=uniform",
                          "model=auto", f"init_from={llava_source}", "optim.lr=0", *TRAIN[:-2],
                          f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=380)
    assert out.returncode == 0, out.stderr[-3000:]
    checkpoint = run_dir / "checkpoints" / "last.ckpt"  # a folder (linked to the last step's)
    assert checkpoint.is_dir() and (checkpoint / ".metadata").is_file()
    stored = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    chunked = [k for k, m in stored.items() if k.startswith("state_dict.") and len(getattr(m, "chunks", [])) > 1]
    assert bool(chunked) == ("cluster.zero=3" in layout)  # ZeRO 3 saved each parameter as shards
    target = tmp_path / "hf"
    export(export_cfg(f"checkpoint={checkpoint}", f"target={target}"))
    exported, original = all_tensors(target), all_tensors(llava_source)
    assert exported.keys() == original.keys()
    for key, t in original.items():
        torch.testing.assert_close(exported[key], t, rtol=0, atol=0, msg=key)


# ---------------------------------------------------------------- bad input


def test_an_existing_target_is_refused_unless_overwrite(tmp_path, llava_checkpoint):
    target = tmp_path / "hf"
    target.mkdir()
    (target / "old.txt").write_text("x")
    out = subprocess.run([sys.executable, "-m", "omnibal_pl.cli.export", f"checkpoint={llava_checkpoint}",
                          f"target={target}"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and "overwrite=true" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert (target / "old.txt").is_file()
    export(export_cfg(f"checkpoint={llava_checkpoint}", f"target={target}", "overwrite=true"))
    assert not (target / "old.txt").exists() and (target / "config.json").is_file()


def test_a_family_the_config_does_not_match_is_refused(tmp_path, llava_checkpoint):
    with pytest.raises(ConfigError, match=r"family=internvl_chat.*model\.projector\.kind='mlp2x_gelu'"):
        export(export_cfg(f"checkpoint={llava_checkpoint}", f"target={tmp_path / 'hf'}", "family=internvl_chat",
                          "source=null"))
    assert not (tmp_path / "hf").exists()


def test_a_source_describing_another_model_is_refused(tmp_path, llava_checkpoint, internvl_source):
    with pytest.raises(ConfigError, match=r"source=.*projector\.kind: 'mlp2x_gelu' != 'pixel_shuffle_mlp'"):
        export(export_cfg(f"checkpoint={llava_checkpoint}", f"target={tmp_path / 'hf'}", f"source={internvl_source}"))


def test_without_a_tokenizer_the_weights_are_exported_and_the_missing_tokenizer_named(tmp_path, llava_checkpoint, capsys):
    target = tmp_path / "hf"
    result = export(export_cfg(f"checkpoint={llava_checkpoint}", f"target={target}", "tokenizer=null"))
    assert result.tokenizer_files == [] and (target / "model.safetensors").is_file()
    assert not (target / "tokenizer.json").exists()
    assert "tokenizer: no tokenizer files copied" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="tokenizer=.*no such folder"):
        export(export_cfg(f"checkpoint={llava_checkpoint}", f"target={tmp_path / 'b'}", f"tokenizer={tmp_path / 'none'}"))


def test_dtype_casts_every_tensor_and_an_unknown_one_is_named(tmp_path, llava_checkpoint):
    export(export_cfg(f"checkpoint={llava_checkpoint}", f"target={tmp_path / 'hf'}", "dtype=bfloat16"))
    assert {t.dtype for t in all_tensors(tmp_path / "hf").values()} == {torch.bfloat16}
    with pytest.raises(ConfigError, match="dtype='fp8' is not one of"):
        export(export_cfg(f"checkpoint={llava_checkpoint}", f"target={tmp_path / 'x'}", "dtype=fp8"))


def test_the_tokenizer_defaults_to_the_runs_own(tmp_path, llava_checkpoint, llava_source):
    """Without a source (source=null), tokenizer=auto takes the run's dataset.tokenizer from its config.yaml."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").symlink_to(llava_checkpoint)
    (run / "config.yaml").write_text(yaml.safe_dump({"dataset": {"tokenizer": str(llava_source / "tokenizer.json")}}))
    result = export(export_cfg(f"checkpoint={run / 'checkpoints' / 'last.ckpt'}", f"target={tmp_path / 'hf'}",
                               "source=null"))
    assert "tokenizer.json" in result.tokenizer_files and "chat_template.jinja" in result.tokenizer_files


def test_model_auto_and_a_disagreeing_model(llava_source):
    with pytest.raises(ConfigError, match=r"model=tiny disagrees with init_from=.*projector\.kind: 'pixel_shuffle_mlp' != 'mlp2x_gelu'"):
        parse_run_config(cfg_of("model=tiny", f"init_from={llava_source}"))
    with pytest.raises(ConfigError, match="model=auto .* set init_from"):
        parse_run_config(cfg_of("model=auto"))
    with pytest.raises(ConfigError, match=r"model\.llm cannot be set"):
        parse_run_config(cfg_of("model=auto", f"init_from={llava_source}", "+model.llm.layers=3"))
    run = parse_run_config(cfg_of("model=auto", f"init_from={llava_source}", "model/sparsify=dynamic_llava",
                                  "model.sparsify.sparse_layer=1"))
    assert run.model.vision.num_blocks == 2 and run.model.llm.vocab_size == 64 and run.model.sparsify.enabled
