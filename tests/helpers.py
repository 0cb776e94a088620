"""What several test modules share: model presets and plans, a tiny local tokenizer, small images,
annotation files, the real statistics in ../shared, and a LightningModule that records what it trained on.

Nothing is downloaded: the tokenizer is a word-level ``tokenizers.Tokenizer`` built here.
"""
from __future__ import annotations

import csv
import faulthandler
import json
import os
import signal
import sys
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable

import lightning as L
import numpy as np
from hydra import compose, initialize_config_module
from omegaconf import DictConfig
import torch
import torch.multiprocessing as mp
from PIL import Image
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from omnibal_pl.batch import PackedBatch
from omnibal_pl.conf import preset
from omnibal_pl.data import TemplateConfig, TilingConfig
from omnibal_pl.model import VLM, TransformerBlock, VLMConfig
from omnibal_pl.model.hf_loading import Layout, to_hf_state_dict
from omnibal_pl.model.sparsify import Sparsifier
from omnibal_pl.plan import Plan
from omnibal_pl.train.objective import micro_batch_objective

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_LENGTH_FILES = sorted((SHARED_DATA / "omnibal_lengths").glob("*.json"))

SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<image>"]
WORDS = ["USER", "ASSISTANT", ":", "system", "user", "assistant", "what", "is", "this", "a", "cat", "dog",
         "describe", "image", "the", "and", "it", "red", "blue", "compare", "hello", "world", "yes", "no"]

# small tiles keep pixel work negligible; the tiling logic is the same at 448 px
TILE = 28
INTERNVL_TILING = TilingConfig(mode="internvl", image_size=TILE, min_tiles=1, max_tiles=6)
LLAVA_TILING = TilingConfig(mode="llava", image_size=TILE, max_tiles=1, use_thumbnail=False)
INTERNVL_TEMPLATE = TemplateConfig(name="internlm2-chat", tokens_per_tile=4, image_context_token="<IMG_CONTEXT>")
LLAVA_TEMPLATE = TemplateConfig(name="vicuna_v1", tokens_per_tile=9, image_context_token="<image>")


def make_tokenizer(folder: Path) -> Path:
    """Writes ``folder/tokenizer.json`` (word level, the special tokens of both templates); returns the folder."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def make_image(path: Path, width: int, height: int, color: tuple[int, int, int] = (200, 30, 90)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), color).save(path)
    return path


def conversation(question: str = "what is this", answer: str = "a red cat", images: int = 1) -> list[dict]:
    return [
        {"from": "human", "value": "<image>\n" * images + question},
        {"from": "gpt", "value": answer},
        {"from": "human", "value": "describe it"},
        {"from": "gpt", "value": "the cat is red and the dog is blue"},
    ]


def llava_records(root: Path) -> list[dict]:
    """Single-image samples of several aspect ratios, a text-only and a multi-image sample; images under root."""
    sizes = [(28, 28), (90, 30), (30, 100), (200, 150), (60, 61)]
    recs = []
    for k, (w, h) in enumerate(sizes):
        make_image(root / f"img{k}.png", w, h)
        recs.append({"id": f"s{k}", "image": f"img{k}.png", "conversations": conversation()})
    recs.append({"id": "text", "conversations": conversation("hello world", "yes", images=0)})
    recs.append({"id": "multi", "image": ["img1.png", "img3.png"], "conversations": conversation("compare", "no", images=2)})
    return recs


def truncated_jpeg(path: Path) -> Path:
    """A JPEG whose header reads (its size is known) but whose pixel data is cut in half: decoding it fails."""
    pixels = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def missing_image(root: Path, records: list[dict]) -> None:
    """Breaks :func:`llava_records`: sample s4's image (its 5th record) is deleted."""
    (root / "img4.png").unlink()


def undecodable_pixels(root: Path, records: list[dict]) -> None:
    """Breaks :func:`llava_records`: sample s2 (its 3rd record) points to a truncated JPEG, found only when decoded."""
    truncated_jpeg(root / "img2.jpg")
    records[2]["image"] = "img2.jpg"


def llava_dataset_node(root: Path, tokenizer: Path, **extra: Any) -> dict:
    """The ``dataset`` node of a LLaVA run over :func:`llava_records` written under ``root`` (one tile per
    image, the test tokenizer at ``tokenizer``), with ``extra`` keys."""
    annotation = write_json(root / "train.json", llava_records(root))
    return {"name": "llava", "_target_": "omnibal_pl.data.LlavaDataset", "annotation": str(annotation),
            "image_root": str(root), "tokenizer": str(tokenizer), "overlong": "error",
            "template": {"_target_": "omnibal_pl.data.TemplateConfig", "name": LLAVA_TEMPLATE.name,
                         "tokens_per_tile": LLAVA_TEMPLATE.tokens_per_tile,
                         "image_context_token": LLAVA_TEMPLATE.image_context_token},
            "tiling": {"_target_": "omnibal_pl.data.TilingConfig", "mode": "llava",
                       "image_size": LLAVA_TILING.image_size, "max_tiles": 1, "use_thumbnail": False},
            **extra}


def assert_stats_equal_samples(dataset, table) -> None:
    """The statistics ``table`` (image headers only) say what reading each sample of ``dataset`` gives."""
    assert len(table) == len(dataset)
    for i in range(len(dataset)):
        s = dataset[i]
        assert (table.vit[i], table.tokens[i], table.image_flag[i]) == (s.num_tiles, s.num_tokens, int(s.image_flags.sum())), i


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def model_config(name: str = "tiny") -> VLMConfig:
    """A published model config (``conf/model/<name>.yaml``)."""
    return VLMConfig.from_dict(preset("model", name))


def plan_of(cfg: VLMConfig, stages: list[list[str]], recompute: dict[str, str] | None = None, *, pp: int | None = None,
            micro_batches: int | None = None, schedule: str = "1f1b", dp: int = 1, zero: int = 0, vit_cap: int = 8,
            token_cap: int = 64) -> Plan:
    """A :class:`Plan` of ``cfg`` with these stages (pp defaults to one stage per rank, micro-batches to the
    stage count) and the given micro-batch shape."""
    pp = pp or len(stages)
    return Plan(model=cfg.name, stages=stages, recompute=recompute or {}, schedule=schedule, pp=pp,
                micro_batches=micro_batches or len(stages), vit_cap=vit_cap, token_cap=token_cap, dp=dp, zero=zero)


SMALL_PREDICTOR = dict(sparse_layer=1, predictor_dim=32, predictor_heads=4, predictor_mlp_dim=64)


def tiny_cfg(sparsify: bool = True, layers: int = 2, **knobs) -> VLMConfig:
    """The tiny model with ``layers`` LLM layers, sparsified from layer 1 with small predictors unless
    ``sparsify`` is False; ``knobs`` override the sparsify config."""
    data = preset("model", "tiny")
    data["llm"]["layers"] = layers
    data["attention_backend"] = "sdpa"
    data["sparsify"] = {"enabled": sparsify, **SMALL_PREDICTOR, **knobs}
    return VLMConfig.from_dict(data)


def bias_predictors(model: VLM, keep: bool) -> None:
    """Bias every predictor's last layer so that it keeps (or drops) every token (Gumbel noise cannot flip it)."""
    for m in model.modules():
        if isinstance(m, Sparsifier):
            for predictor in (m.vision, m.output_text, m.instruct_text):
                if predictor is not None:
                    last = [p for p in predictor.modules() if isinstance(p, torch.nn.Linear)][-1]
                    last.bias.data = torch.tensor([100.0, -100.0] if keep else [-100.0, 100.0])


def internvl_config_json(cfg: VLMConfig, llm_arch: str) -> dict:
    v, t = cfg.vision, cfg.llm
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "select_layer": v.select_layer,
        "downsample_ratio": 0.5, "ps_version": "v2", "force_image_size": v.image_size,
        "vision_config": {
            "hidden_size": v.width, "image_size": v.image_size, "patch_size": v.patch_size,
            "num_hidden_layers": v.depth, "num_attention_heads": v.heads, "intermediate_size": v.mlp_dim,
            "qkv_bias": v.qkv_bias, "qk_normalization": v.qk_norm,
            "norm_type": "rms_norm" if v.norm == "rmsnorm" else "layer_norm", "layer_norm_eps": v.norm_eps,
        },
        "llm_config": {
            "architectures": [llm_arch], "vocab_size": t.vocab_size, "hidden_size": t.hidden,
            "num_hidden_layers": t.layers, "num_attention_heads": t.heads, "num_key_value_heads": t.kv_heads,
            "intermediate_size": t.intermediate, "rope_theta": t.rope_theta, "rms_norm_eps": t.rms_eps,
            "tie_word_embeddings": t.tie_embeddings, "bias": False,
        },
    }


def internvl_model(llm_arch: str) -> VLM:
    torch.manual_seed(1)
    cfg = VLMConfig.from_dict({
        "name": "internvl_tiny", "image_context_id": 7,
        "vision": {"image_size": 56, "patch_size": 14, "width": 40, "depth": 3, "heads": 5, "mlp_dim": 80,
                   "norm": "rmsnorm", "qkv_bias": False, "qk_norm": True, "select_layer": -1},
        "llm": {"vocab_size": 96, "hidden": 48, "layers": 2, "heads": 6, "kv_heads": 2, "intermediate": 64,
                "rope_theta": 1e6, "qkv_bias": llm_arch.startswith("Qwen2")},
    })
    model = VLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def write_internvl_checkpoint(model: VLM, path: Path, llm_arch: str, shards: int = 3) -> Layout:
    layout = Layout("internvit", "internlm2" if llm_arch.startswith("InternLM2") else "llama")
    state = to_hf_state_dict(model, layout)
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, path / name)
        weight_map.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(internvl_config_json(model.cfg, llm_arch)))
    (path / "added_tokens.json").write_text(json.dumps({"<IMG_CONTEXT>": model.cfg.image_context_id}))
    return layout


def qwen_hf_model(family: str, image_token_id: int = 7):
    """A small random transformers ``Qwen2VLForConditionalGeneration`` (``family`` qwen2_vl) or
    ``Qwen2_5_VLForConditionalGeneration`` (qwen2_5_vl: windows of 2 x 2 merge blocks = 56 px, block 1 over whole
    images), 2 LLM layers with M-RoPE sections 2 + 2 + 2, in eval mode. Its weights, norms and biases are moved by
    large random amounts, so a position, order or mapping mistake shows in the logits."""
    import transformers

    text = dict(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 2, 2]})
    ids = dict(image_token_id=image_token_id, vision_start_token_id=5, vision_end_token_id=6, video_token_id=8)
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=4, hidden_size=48)
        model = transformers.Qwen2VLForConditionalGeneration(
            transformers.Qwen2VLConfig(vision_config=vision, text_config=text, **ids))
    else:
        vision = dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=40, out_hidden_size=48, window_size=56,
                      fullatt_block_indexes=[1])
        model = transformers.Qwen2_5_VLForConditionalGeneration(
            transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.15 * torch.randn_like(p))
    return model.eval()


FAST = ["trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "dataset.generator.samples=600"]


def cfg_of(*overrides: str, hydra_node: bool = False) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides``, as ``omnibal-train`` would compose it."""
    with initialize_config_module(config_module="omnibal_pl.conf", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=hydra_node)


def losses_in(run_dir: Path) -> dict[int, float]:
    """``train/loss`` by step from a run directory's metrics.csv."""
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


class RecomputeCounter:
    """Per transformer block: forwards (``forward`` calls), MLP runs and attention-core runs.

    A block under ``full`` recompute runs its MLP twice per micro-batch, under ``attention`` its
    attention core twice and its MLP once, under ``none`` everything once. Counted on entry (pre-hooks):
    non-reentrant checkpointing stops a recompute as soon as the last saved tensor is rebuilt, which
    can be inside the MLP, before a forward hook would fire.
    """

    def __init__(self, stages) -> None:
        self.counts: dict[str, dict[str, int]] = {}
        original = TransformerBlock.attention_core
        owner = {}
        for stage in stages:
            for name, block in stage.model.blocks():
                if isinstance(block, TransformerBlock):
                    owner[id(block)] = name
                    self.counts[name] = {"forward": 0, "mlp": 0, "core": 0}
                    block.register_forward_pre_hook(self._hook(name, "forward"))
                    block.mlp.register_forward_pre_hook(self._hook(name, "mlp"))
        counts = self.counts

        def counting_core(block, fn, *args):
            def counted(*a):
                counts[owner[id(block)]]["core"] += 1
                return fn(*a)
            return original(block, counted, *args)

        TransformerBlock.attention_core = counting_core

    def _hook(self, name: str, key: str):
        def hook(*_):
            self.counts[name][key] += 1
        return hook

    def reset(self) -> None:
        for c in self.counts.values():
            c.update(forward=0, mlp=0, core=0)


class RecordingModule(L.LightningModule):
    """One scalar parameter; the loss touches every micro-batch so DDP has gradients to sync.

    Records (epoch, global step, sample ids, tiles, tokens) per micro-batch and, at the end of fit,
    writes them to ``out_dir/rank{global_rank}.jsonl`` when ``out_dir`` is set.
    """

    def __init__(self, out_dir: str | None = None) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.out_dir = out_dir
        self.seen: list[dict] = []

    def training_step(self, batch: PackedBatch, batch_idx: int) -> torch.Tensor:
        self.seen.append({"epoch": self.current_epoch, "step": self.global_step, "batch_idx": batch_idx,
                          "ids": batch.sample_ids.tolist(), "tiles": batch.num_tiles, "tokens": batch.num_tokens,
                          "shape": list(batch.input_ids.shape), "tile_shape": list(batch.pixel_values.shape)})
        return (self.w - 1.0) ** 2 * batch.loss_weight.sum() / batch.loss_weight.sum().clamp(min=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_fit_end(self) -> None:
        if self.out_dir:
            path = Path(self.out_dir) / f"rank{self.global_rank}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in self.seen))


class FailAtStep(L.Callback):
    """Makes global rank ``rank`` fail once a training batch ends at global step ``step`` or later, unless
    ``marker`` exists: ``how="kill"`` ends the process with SIGKILL (as the OOM killer or a lost node would),
    ``"hang"`` stops it making progress (sleeps forever, outside any collective), ``"save"`` kills it inside the
    next checkpoint save, after the checkpoint is written under its temporary name, which is torn to half its
    bytes, and before it is renamed. Writes the failure's wall time to ``marker`` first, so a restarted run does
    not fail again and a test can time the job's end from it.
    Usable from the command line: ``trainer.callbacks=[{_target_:tests.helpers.FailAtStep,...}]``."""

    def __init__(self, rank: int, step: int, marker: str, how: str = "kill") -> None:
        self.rank, self.step, self.marker, self.how = rank, step, Path(marker), how

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank != self.rank or trainer.global_step < self.step or self.marker.exists():
            return
        if self.how == "save":
            import omnibal_pl.parallel.dcp as dcp_module
            import omnibal_pl.train.checkpoints as checkpoints_module

            def torn_then_killed(tmp: Path, path: Path) -> None:
                self.marker.write_text(f"{time.time()}\n")
                torn = tmp if tmp.is_file() else tmp / ".metadata"
                with open(torn, "r+b") as f:
                    f.truncate(torn.stat().st_size // 2)
                os.kill(os.getpid(), signal.SIGKILL)

            dcp_module.publish = checkpoints_module.publish = torn_then_killed
            return
        self.marker.write_text(f"{time.time()}\n")
        if self.how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        while True:
            time.sleep(1)


class NaNLossAtSteps(L.Callback):
    """Makes the objective of every micro-batch of the given optimizer steps (0-based) NaN, as a corrupt sample's
    would be, in whichever training module runs (data-parallel or pipeline); patched from ``setup`` to
    ``teardown`` in each process. Usable from the command line like :class:`FailAtStep`."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)
        self._saved: list[tuple[Any, Callable]] = []

    def setup(self, trainer, pl_module, stage) -> None:
        import omnibal_pl.train.module as dp_module
        import omnibal_pl.train.pipeline_module as pipeline_module

        for owner in (dp_module, pipeline_module):
            original = owner.micro_batch_objective
            self._saved.append((owner, original))

            def poisoned(out, batch, cfg, original=original):
                result = original(out, batch, cfg)
                if trainer.global_step not in self.steps:
                    return result
                nan = torch.tensor(float("nan"), device=result.value.device)
                return result._replace(value=result.value * nan, loss_sum=result.loss_sum * nan)

            owner.micro_batch_objective = poisoned

    def teardown(self, trainer, pl_module, stage) -> None:
        for owner, original in self._saved:
            owner.micro_batch_objective = original
        self._saved = []

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.teardown(trainer, pl_module, None)  # a run stopped by the non-finite rule skips teardown


_FACTORIES = {torch.tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.as_tensor}
_COLLECTIVES = ("all_reduce", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce")


class CollectiveDevices(L.Callback):
    """Enforces on CPU what NCCL enforces on GPU: every tensor that omnibal_pl hands to a collective lives on a
    device the code chose. On CPU the default device and the module's are the same, so the check is that no
    such tensor was made by a factory (``torch.tensor``, ``zeros``, ...) called from omnibal_pl without a
    ``device`` (it would land on the CPU of a GPU run: "No backend type associated with device type cpu").
    Active from ``on_train_start`` to ``on_train_end`` in each process; ``violations`` lists the offenders."""

    def __init__(self) -> None:
        self.violations: list[str] = []
        self._mode: torch.overrides.TorchFunctionMode | None = None
        self._saved: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        implicit: dict[int, tuple[weakref.ref, str]] = {}  # id -> (the tensor, where it was made): ids are reused

        def tainted(t: Any) -> str:
            ref, site = implicit.get(id(t), (None, ""))
            return site if ref is not None and ref() is t else ""

        class Factories(torch.overrides.TorchFunctionMode):
            """Marks tensors made by a factory without ``device`` from omnibal_pl, and everything computed from
            them, until an explicit ``.to(device)``."""

            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                if func in _FACTORIES and "device" not in kwargs:
                    site = _omnibal_caller()
                elif func is torch.Tensor.to and (len(args) > 1 or "device" in kwargs):
                    for t in _tensors(out):  # an explicit move (on CPU it returns the same tensor)
                        implicit.pop(id(t), None)
                    return out
                else:
                    site = next(filter(None, map(tainted, _tensors((args, kwargs)))), "")
                if site:
                    for t in _tensors(out):
                        implicit[id(t)] = (weakref.ref(t), site)
                return out

        def checked(name: str, original: Callable) -> Callable:
            def collective(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                site = tainted(tensor)
                if site:
                    self.violations.append(f"{name} got a tensor made without a device at {site}")
                return original(tensor, *args, **kwargs)
            return collective

        self._saved = {n: getattr(torch.distributed, n) for n in _COLLECTIVES}
        for name, original in self._saved.items():
            setattr(torch.distributed, name, checked(name, original))
        self._mode = Factories()
        self._mode.__enter__()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mode.__exit__(None, None, None)
        for name, original in self._saved.items():
            setattr(torch.distributed, name, original)


def _tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors in a (nested) tuple, list or dict."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _omnibal_caller() -> str | None:
    """``file:line`` of the code that called into torch (the first frame outside torch), when it is omnibal_pl's."""
    frame = sys._getframe(2)
    torch_dir = os.path.dirname(torch.__file__)
    while frame is not None and frame.f_code.co_filename.startswith(torch_dir):
        frame = frame.f_back
    if frame is None or f"{os.sep}omnibal_pl{os.sep}" not in frame.f_code.co_filename:
        return None
    return f"{frame.f_code.co_filename.split(os.sep + 'omnibal_pl' + os.sep)[-1]}:{frame.f_lineno}"


def train_on(model: VLM, batch: PackedBatch, steps: int, lr: float = 1e-2, **adamw: Any) -> list[float]:
    """``steps`` AdamW steps of ``model``'s trainable parameters on one batch; the loss of each step
    (the training objective's weighted mean)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, **adamw)
    losses = []
    for _ in range(steps):
        objective = micro_batch_objective(model(batch), batch, model.cfg)
        loss = objective.value / objective.weight
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _with_faulthandler(rank: int, entry: Callable[..., None], args: tuple) -> None:
    faulthandler.enable()  # a C++ abort then prints every thread's Python stack to the captured stderr
    entry(rank, *args)


def _start(entry: Callable[..., None], world: int, args: tuple) -> None:
    mp.start_processes(_with_faulthandler, args=(entry, args), nprocs=world, start_method="spawn", join=True,
                       daemon=True)


def run_ranks(entry: Callable[..., None], world: int, args_of_attempt: Callable[[int], tuple]) -> tuple:
    """Runs ``entry(rank, *args_of_attempt(0))`` on ``world`` spawned processes and waits for them; returns the
    ``args`` of the attempt that completed.

    A rank killed by a signal (a C++ abort inside torch, seen once in CI in a ZeRO-2 gloo run that passed about a
    hundred local reruns) makes the ranks run once more, on ``args_of_attempt(1)`` (its own rendezvous and result
    folder), with a warning. A rank that raised, or a second killed rank, fails the test as it is."""
    args = args_of_attempt(0)
    try:
        _start(entry, world, args)
    except mp.ProcessExitedException as e:
        if e.signal_name is None:
            raise
        warnings.warn(f"rank {e.error_index} was killed by {e.signal_name}; its Python stacks are in the captured "
                      "stderr. Running the ranks once more")
        args = args_of_attempt(1)
        _start(entry, world, args)
    return args
