"""omnibal-export of the Qwen family: transformers' Qwen2VL / Qwen2_5_VLForConditionalGeneration loads the folder with
no missing or unexpected key and computes our logits on a packed batch, sample by sample; the folder starts another
run (init_from) with identical logits; a family the model does not match is named."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from safetensors import safe_open

from omnibal_pl.cli.export import export
from omnibal_pl.errors import ConfigError
from omnibal_pl.model.hf_loading import load_hf_model, vlm_config_from_hf
from omnibal_pl.model.qwen_vision import pack_qwen_samples
from omnibal_pl.train.module import OmniBalModule
from omnibal_pl.train.schemas import parse_run_config

from tests.helpers import cfg_of, qwen_hf_model

transformers = pytest.importorskip("transformers")

IMAGE = 7
PATCH_DIM = 3 * 2 * 14 * 14
GRIDS = [[(1, 4, 4)], [(1, 2, 6), (1, 4, 2)]]  # sample 0: one image of 2 x 2 merge blocks; sample 1: 1 x 3 and 2 x 1
CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


def export_cfg(*overrides: str):
    with initialize_config_module(config_module="omnibal_pl.conf", version_base="1.3"):
        return compose(config_name="export", overrides=list(overrides))


def tensor_names(folder: Path) -> set[str]:
    names: set[str] = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as handle:
            names.update(handle.keys())
    return names


@pytest.fixture(scope="module", params=sorted(CLASSES))
def trained(request, tmp_path_factory) -> tuple[Path, Path, torch.nn.Module]:
    """A Qwen folder, and a checkpoint as omnibal-train writes it (``model.<name>`` tensors, the model config and
    ``init_from`` in ``hyper_parameters``) of our model loaded from it with every weight then moved, as training
    moves them: an export that copied the source's tensors cannot pass for the trained ones."""
    torch.manual_seed(0)
    source = tmp_path_factory.mktemp(request.param)
    qwen_hf_model(request.param, IMAGE).save_pretrained(source)
    model = load_hf_model(source)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    checkpoint = source.parent / f"{request.param}.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model": model.cfg.to_dict(), "init_from": str(source), "seed": 0}}, checkpoint)
    return source, checkpoint, model.eval()


def packed_inputs(cfg):
    gen = torch.Generator().manual_seed(3)
    ids = []
    for grids in GRIDS:
        parts = []
        for t, h, w in grids:
            parts += [torch.randint(10, 96, (3,), generator=gen), torch.full((t * h * w // 4,), IMAGE)]
        ids.append(torch.cat([*parts, torch.randint(10, 96, (4,), generator=gen)]))
    pixels = [torch.randn(sum(t * h * w for t, h, w in g), PATCH_DIM, generator=gen) for g in GRIDS]
    return ids, pixels, pack_qwen_samples(cfg, ids, pixels, GRIDS, token_cap=64, block_cap=16)


@pytest.mark.parametrize("source", ["auto", "null"])
def test_transformers_loads_the_export_and_computes_our_logits(tmp_path, trained, source):
    """source=auto keeps the source folder's config.json; source=null writes one from our config. Either way the
    tensors have the published names (those save_pretrained wrote) and transformers computes our packed logits."""
    folder, checkpoint, ours = trained
    family = ours.cfg.vision.family
    target = tmp_path / "hf"
    export(export_cfg(f"checkpoint={checkpoint}", f"target={target}", f"source={source}", "tokenizer=null"))
    hf, info = getattr(transformers, CLASSES[family]).from_pretrained(target, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert tensor_names(target) == tensor_names(folder)
    config = json.loads((target / "config.json").read_text())
    if source == "auto":
        assert config == json.loads((folder / "config.json").read_text())
    else:
        assert config["architectures"] == [CLASSES[family]]
        read_back = vlm_config_from_hf(target)
        assert (read_back.vision, read_back.llm, read_back.projector) == (ours.cfg.vision, ours.cfg.llm, ours.cfg.projector)
        assert read_back.image_context_id == IMAGE
    ids, pixels, batch = packed_inputs(ours.cfg)
    with torch.no_grad():
        got = ours(batch)[0]
        bounds = batch.cu_seqlens.tolist()
        for s in range(len(GRIDS)):
            expected = hf.eval()(input_ids=ids[s][None], pixel_values=pixels[s], image_grid_thw=torch.tensor(GRIDS[s]),
                                 mm_token_type_ids=(ids[s] == IMAGE).int()[None]).logits[0]
            torch.testing.assert_close(got[bounds[s]:bounds[s + 1]], expected, rtol=1e-4, atol=1e-4)


def test_export_then_init_from_computes_identical_logits(tmp_path, trained):
    _, checkpoint, ours = trained
    target = tmp_path / "hf"
    export(export_cfg(f"checkpoint={checkpoint}", f"target={target}", "source=null", "tokenizer=null"))
    run = parse_run_config(cfg_of("model=auto", f"init_from={target}"))
    again = OmniBalModule(run.model, init_from=str(target)).model.eval()
    _, _, batch = packed_inputs(ours.cfg)
    with torch.no_grad():
        torch.testing.assert_close(again(batch), ours(batch), rtol=0, atol=0)


def test_a_family_the_model_does_not_match_is_named(tmp_path, trained):
    _, checkpoint, ours = trained
    other = "qwen2_vl" if ours.cfg.vision.family == "qwen2_5_vl" else "qwen2_5_vl"
    with pytest.raises(ConfigError, match=rf"family={other}: .*model\.vision\.family='{ours.cfg.vision.family}'"):
        export(export_cfg(f"checkpoint={checkpoint}", f"target={tmp_path / 'a'}", f"family={other}", "source=null"))
    with pytest.raises(ConfigError, match=rf"family={other}, but source=.* is a {ours.cfg.vision.family} folder"):
        export(export_cfg(f"checkpoint={checkpoint}", f"target={tmp_path / 'b'}", f"family={other}"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
