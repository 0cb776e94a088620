"""``omnibal-eval``: answer a LLaVA-layout question file with :func:`omnibal_pl.model.generate.generate`.

Input JSONL, one question a line: ``{"question_id", "image", "text"}`` (``image`` relative to
``--image-folder``; may be absent for text-only questions). Output JSONL in the layout LLaVA's
evaluation scripts read: ``{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}``.
Prints throughput, prefill FLOPs and peak KV-cache memory, with the dense figures beside them.

Chunking over processes as LLaVA's ``model_vqa_loader`` does: ``--num-chunks N --chunk-idx i`` answers
the i-th of N contiguous chunks; ``--merge a.jsonl b.jsonl ...`` concatenates chunk files into
``--answers-file``. Example (LLaVA-1.5 checkpoint, Dynamic-LLaVA predictors from a training run)::

    omnibal-eval --model-path llava-1.5-7b-hf --sparsify dynamic_llava --predictor-weights pred.pt \\
        --question-file q.jsonl --image-folder images/ --answers-file a.0.jsonl --num-chunks 2 --chunk-idx 0
"""
from __future__ import annotations

import argparse
import json
import math
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import yaml
from omegaconf import OmegaConf

from omnibal_pl.batch import PackedBatch
from omnibal_pl.cli.vqa import vqa_accuracy
from omnibal_pl.conf import CONF_DIR
from omnibal_pl.errors import DataError, OmniBalError
from omnibal_pl.model.generate import GenerationResult, generate_batch
from omnibal_pl.model.sparsify import SparsifyConfig, is_original_predictor_key, load_original_predictors
from omnibal_pl.model.vlm import VLM

SPARSIFY_DIR = CONF_DIR / "model" / "sparsify"


def read_questions(path: str | Path) -> list[dict]:
    """Questions of a JSONL file; each line needs ``question_id`` and ``text``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: question file not found")
    questions = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_no}: not a JSON object ({e})") from e
        missing = [k for k in ("question_id", "text") if k not in q]
        if missing:
            raise DataError(f"{path}:{line_no}: question lacks {missing}; LLaVA's layout is question_id, image, text")
        questions.append(q)
    return questions


def get_chunk(items: Sequence, num_chunks: int, chunk_idx: int) -> list:
    """The ``chunk_idx``-th of ``num_chunks`` contiguous chunks of ceil(len / num_chunks) items (LLaVA's split)."""
    if num_chunks < 1 or not 0 <= chunk_idx < num_chunks:
        raise DataError(f"--chunk-idx {chunk_idx} is not in [0, --num-chunks {num_chunks})")
    size = math.ceil(len(items) / num_chunks)
    return list(items[chunk_idx * size:(chunk_idx + 1) * size])


def write_answers(path: str | Path, answers: Iterable[dict]) -> None:
    with open(path, "w") as f:
        for a in answers:
            f.write(json.dumps(a) + "\n")


def merge_answers(chunk_files: Sequence[str | Path], out: str | Path) -> int:
    """Concatenate chunk answer files in the given order into ``out``; returns the answer count."""
    lines = []
    for path in chunk_files:
        if not Path(path).is_file():
            raise DataError(f"{path}: chunk answer file not found; run every chunk before merging")
        lines += [line for line in Path(path).read_text().splitlines() if line.strip()]
    Path(out).write_text("".join(line + "\n" for line in lines))
    return len(lines)


@dataclass
class EvalStats:
    """Totals over answered questions (sums of per-question :class:`GenerationResult` figures)."""

    questions: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    prefill_flops: float = 0.0
    prefill_flops_dense: float = 0.0
    decode_flops: float = 0.0
    decode_flops_dense: float = 0.0
    peak_kv_bytes: int = 0
    peak_kv_bytes_dense: int = 0

    def add(self, r: GenerationResult) -> None:
        self.questions += 1
        self.new_tokens += len(r.tokens)
        self.seconds += r.prefill_seconds + r.decode_seconds
        self.prefill_flops += r.prefill_flops
        self.prefill_flops_dense += r.prefill_flops_dense
        self.decode_flops += r.decode_flops
        self.decode_flops_dense += r.decode_flops_dense
        self.peak_kv_bytes = max(self.peak_kv_bytes, r.kv_bytes)
        self.peak_kv_bytes_dense = max(self.peak_kv_bytes_dense, r.kv_bytes_dense)

    def summary(self) -> str:
        n = max(self.questions, 1)
        rate = self.questions / self.seconds if self.seconds else 0.0
        tps = self.new_tokens / self.seconds if self.seconds else 0.0
        saved = 1 - self.prefill_flops / self.prefill_flops_dense if self.prefill_flops_dense else 0.0
        return (f"{self.questions} questions in {self.seconds:.1f} s: {rate:.2f} questions/s, {tps:.1f} new tokens/s; "
                f"prefill {self.prefill_flops / n / 1e12:.4f} TFLOPs/question (dense {self.prefill_flops_dense / n / 1e12:.4f}, "
                f"-{100 * saved:.0f}%); decoding {self.decode_flops / n / 1e12:.4f} TFLOPs/question "
                f"(dense {self.decode_flops_dense / n / 1e12:.4f}); peak KV cache {self.peak_kv_bytes / 2**20:.2f} MiB "
                f"(dense {self.peak_kv_bytes_dense / 2**20:.2f} MiB)")


def answer_questions(model: VLM, questions: Iterable[dict], encode: Callable[[dict], PackedBatch],
                     decode: Callable[[list[int]], str], model_id: str, max_new_tokens: int,
                     temperature: float = 0.0, eos_token_id: int | None = None, seed: int = 0, batch_size: int = 1,
                     use_cache: bool = True) -> tuple[list[dict], EvalStats]:
    """Answer each question; ``encode`` gives its one-prompt batch, ``decode`` turns token ids into text.

    ``batch_size`` questions are decoded together (:func:`~omnibal_pl.model.generate.generate_batch`; greedy
    answers do not depend on it); ``use_cache=False`` decodes without a KV cache (the FLOPs show the cost)."""
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size}: answer at least 1 question at a time")
    stats = EvalStats()
    generator = torch.Generator().manual_seed(seed)
    answers = []
    questions = list(questions)
    batches = [questions[i:i + batch_size] for i in range(0, len(questions), batch_size)]
    results = (r for group in batches
               for r in generate_batch(model, [encode(q) for q in group], max_new_tokens, temperature, eos_token_id,
                                       generator=generator, use_cache=use_cache))
    for q, r in zip(questions, results):
        stats.add(r)
        answers.append({
            "question_id": q["question_id"], "prompt": q["text"], "text": decode(r.tokens).strip(),
            "answer_id": uuid.uuid4().hex, "model_id": model_id,
            "metadata": {"prefill_flops": r.prefill_flops, "kv_bytes": r.kv_bytes, "prefill_kept": r.prefill_kept},
        })
    return answers, stats


def prompt_batch(input_ids: Sequence[int], pixel_values: torch.Tensor, num_real_tiles: int) -> PackedBatch:
    """A one-prompt :class:`PackedBatch` (no labels) with ``num_real_tiles`` real tiles of ``pixel_values``."""
    n = len(input_ids)
    flags = torch.zeros(pixel_values.shape[0], dtype=torch.long)
    flags[:num_real_tiles] = 1
    return PackedBatch(
        input_ids=torch.tensor([list(input_ids)]), labels=torch.full((1, n), -100), position_ids=torch.arange(n)[None],
        cu_seqlens=torch.tensor([0, n], dtype=torch.int32), max_seqlen=n, pixel_values=pixel_values,
        image_flags=flags, loss_weight=torch.zeros(1, n), sample_ids=torch.zeros(1, dtype=torch.long), num_samples=1,
    )


def load_sparsify(name_or_path: str, llm_layers: int | None = None) -> SparsifyConfig:
    """A ``conf/model/sparsify/<name>.yaml`` group option or a YAML file path, its interpolations resolved for
    an LLM of ``llm_layers`` layers (the options' ``sparse_layer`` depends on it; None: the published layer)."""
    path = Path(name_or_path)
    if not path.is_file():
        path = SPARSIFY_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise DataError(f"--sparsify {name_or_path!r}: neither a file nor one of "
                        f"{sorted(p.stem for p in SPARSIFY_DIR.glob('*.yaml'))}")
    node = OmegaConf.create({"model": {"llm": {"layers": llm_layers}, "sparsify": yaml.safe_load(path.read_text())}})
    return SparsifyConfig(**OmegaConf.to_container(node.model.sparsify, resolve=True))


def _load_model(args: argparse.Namespace) -> VLM:
    from omnibal_pl.model.hf_loading import load_hf_model

    model = load_hf_model(args.model_path)
    sparsify = load_sparsify(args.sparsify, model.cfg.llm.layers)
    if sparsify.enabled:
        if not args.predictor_weights:
            raise DataError("--sparsify enables predictors: give their trained weights with --predictor-weights "
                            "(a torch state dict with our parameter names, e.g. llm.layers.2.sparsifier.*, or "
                            "the original Dynamic-LLaVA's, model.image_score_predictor.*)")
        model.enable_sparsify(sparsify)
        state = torch.load(args.predictor_weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        if any(is_original_predictor_key(k) for k in state):
            load_original_predictors(model, state)
        else:
            wanted = {n for n, _ in model.named_parameters() if ".sparsifier." in n}
            found = {n.removeprefix("model."): t for n, t in state.items() if n.removeprefix("model.") in wanted}
            if set(found) != wanted:
                raise DataError(f"{args.predictor_weights}: lacks predictor weights {sorted(wanted - set(found))[:5]}")
            model.load_state_dict(found, strict=False)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    return model.to(args.device, dtype).eval()


def _encoder(args: argparse.Namespace, model: VLM):
    from PIL import Image

    from omnibal_pl.data.templates import ChatTokenizer, TemplateConfig, load_tokenizer
    from omnibal_pl.data.tiling import TilingConfig, dummy_tiles, tile_image

    tokenizer = load_tokenizer(args.tokenizer or args.model_path)
    chat = ChatTokenizer(tokenizer, TemplateConfig(name=args.template, tokens_per_tile=model.cfg.tokens_per_tile,
                                                   image_context_token=args.image_token))
    tiling = TilingConfig(mode=args.tiling, image_size=model.cfg.vision.image_size, max_tiles=args.max_tiles)
    dtype = next(model.parameters()).dtype

    def encode(q: dict) -> PackedBatch:
        text = q["text"]
        tiles = dummy_tiles(1, tiling)
        if q.get("image"):
            tiles = tile_image(Image.open(Path(args.image_folder) / q["image"]), tiling)
            text = "<image>\n" + text
        ids = chat.generation_prompt([{"role": "user", "content": text}], [len(tiles)] if q.get("image") else [],
                                     str(q["question_id"]))
        batch = prompt_batch(ids, tiles.to(dtype), len(tiles) if q.get("image") else 0)
        return batch.to(args.device)

    def decode(ids: list[int]) -> str:
        return tokenizer.backend.decode(ids, skip_special_tokens=True)

    return encode, decode, chat.end_of_turn_id


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="omnibal-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", help="local Hugging Face checkpoint folder (LLaVA-1.5 or InternVL-Chat)")
    p.add_argument("--model-id", default=None, help="model_id written into the answers (default: the folder name)")
    p.add_argument("--sparsify", default="off", help="conf/model/sparsify option or YAML file (off, dynamic_llava)")
    p.add_argument("--predictor-weights", default=None, help="torch state dict holding the trained predictor weights")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or folder (default: --model-path)")
    p.add_argument("--template", default="vicuna_v1", help="chat format: tokenizer (the tokenizer's own chat "
                   "template), vicuna_v1 (LLaVA-1.5), internlm2-chat, internvl2_5")
    p.add_argument("--image-token", default="<image>", help="image-context token (<image> LLaVA, <IMG_CONTEXT> InternVL)")
    p.add_argument("--tiling", default="llava", help="image preprocessing: llava (pad to square) or internvl")
    p.add_argument("--max-tiles", type=int, default=6, help="internvl tiling: most tiles per image")
    p.add_argument("--question-file")
    p.add_argument("--image-folder", default=".")
    p.add_argument("--answers-file", required=True)
    p.add_argument("--num-chunks", type=int, default=1)
    p.add_argument("--chunk-idx", type=int, default=0)
    p.add_argument("--merge", nargs="+", default=None, help="merge these chunk answer files into --answers-file and exit")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1, help="questions decoded together (per-sample cache lengths)")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="decode without a KV cache: every step reruns prompt + answer (Dynamic-LLaVA's second mode)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                   choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    try:
        if args.merge:
            print(f"{args.answers_file}: {merge_answers(args.merge, args.answers_file)} answers merged")
            return
        if not args.model_path or not args.question_file:
            p.error("--model-path and --question-file are required unless --merge is given")
        model = _load_model(args)
        encode, decode, eos = _encoder(args, model)
        questions = get_chunk(read_questions(args.question_file), args.num_chunks, args.chunk_idx)
        answers, stats = answer_questions(model, questions, encode, decode, args.model_id or Path(args.model_path).name,
                                          args.max_new_tokens, args.temperature, eos, args.seed, args.batch_size,
                                          not args.no_kv_cache)
        Path(args.answers_file).parent.mkdir(parents=True, exist_ok=True)
        write_answers(args.answers_file, answers)
        print(f"{args.answers_file}: {stats.summary()}")
        accuracy, scored = vqa_accuracy(questions, [a["text"] for a in answers])
        if scored:
            print(f"VQA accuracy {100 * accuracy:.2f}% over {scored} questions with answers (normalised exact match)")
    except OmniBalError as e:
        raise SystemExit(f"omnibal-eval: {e}") from e


if __name__ == "__main__":
    main()
