"""omnibal-eval: file handling (LLaVA layouts, chunks, merge), statistics and input errors."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from omnibal_pl.cli.eval import answer_questions, get_chunk, load_sparsify, main, prompt_batch, read_questions, write_answers
from omnibal_pl.conf import preset
from omnibal_pl.errors import DataError
from omnibal_pl.model import VLM
from omnibal_pl.model.sparsify import SparsifyConfig
from tests.helpers import SMALL_PREDICTOR, internvl_model, make_image, make_tokenizer, tiny_cfg, write_internvl_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return VLM(tiny_cfg()).eval()


def test_eval_file_round_trip_with_chunks_and_merge(tiny, tmp_path, capsys):
    cfg = tiny.cfg
    questions = [{"question_id": f"q{i}", "image": f"img{i}.jpg", "text": " ".join(str(10 + i + k) for k in range(3 + i))}
                 for i in range(5)]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))

    def encode(q: dict):  # token ids straight from the text; two tiles of random pixels
        ids = [1] + [cfg.image_context_id] * (2 * cfg.tokens_per_tile) + [int(t) for t in q["text"].split()]
        return prompt_batch(ids, torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size,
                                             generator=torch.Generator().manual_seed(len(ids))), 2)

    def decode(ids: list[int]) -> str:
        return " ".join(map(str, ids))

    loaded = read_questions(tmp_path / "q.jsonl")
    assert loaded == questions
    whole, stats = answer_questions(tiny, loaded, encode, decode, "tiny", max_new_tokens=4)
    assert stats.questions == 5 and stats.prefill_flops < stats.prefill_flops_dense
    assert stats.peak_kv_bytes < stats.peak_kv_bytes_dense and "questions/s" in stats.summary()
    chunks = [get_chunk(loaded, 2, i) for i in range(2)]
    assert [len(c) for c in chunks] == [3, 2]
    for i, chunk in enumerate(chunks):
        write_answers(tmp_path / f"a.{i}.jsonl", answer_questions(tiny, chunk, encode, decode, "tiny", 4)[0])
    main(["--answers-file", str(tmp_path / "merged.jsonl"), "--merge", str(tmp_path / "a.0.jsonl"), str(tmp_path / "a.1.jsonl")])
    assert "5 answers merged" in capsys.readouterr().out
    merged = [json.loads(line) for line in (tmp_path / "merged.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in merged] == [q["question_id"] for q in questions]
    assert all(set(a) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} for a in merged)
    assert [a["text"] for a in merged] == [a["text"] for a in whole]  # greedy: chunking changes nothing
    assert [a["prompt"] for a in merged] == [q["text"] for q in questions]


def test_eval_input_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"question_id": 1, "text": "a"}\n{"image": "x.jpg"}\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        read_questions(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="chunk-idx"):
        get_chunk([1, 2, 3], 2, 2)
    with pytest.raises(DataError, match="dynamic_llava"):
        load_sparsify("nonexistent")
    assert load_sparsify("dynamic_llava").enabled and not load_sparsify("off").enabled



def test_omnibal_eval_cli_on_a_checkpoint_in_chunks(tmp_path, capsys):
    """The whole command: an InternVL-Chat checkpoint folder with a tokenizer, trained predictor weights from
    a Lightning checkpoint, images, two chunk processes and a merge equal to one unchunked run."""

    model = internvl_model("Qwen2ForCausalLM")  # 2 LLM layers; <IMG_CONTEXT> = 7 as in the test tokenizer
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    write_internvl_checkpoint(model, ckpt, "Qwen2ForCausalLM")
    make_tokenizer(ckpt)
    sparsify = {**preset("model/sparsify", "dynamic_llava"), **SMALL_PREDICTOR}
    (tmp_path / "sparsify.yaml").write_text(yaml.safe_dump(sparsify))
    model.enable_sparsify(SparsifyConfig(**sparsify))
    torch.save({"state_dict": {f"model.{n}": p for n, p in model.state_dict().items()}}, tmp_path / "last.ckpt")
    make_image(tmp_path / "images" / "cat.jpg", 60, 40)
    questions = [{"question_id": 1, "image": "cat.jpg", "text": "what is this"},
                 {"question_id": 2, "text": "describe the dog"},
                 {"question_id": 3, "image": "cat.jpg", "text": "is it red"}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    common = ["--model-path", str(ckpt), "--sparsify", str(tmp_path / "sparsify.yaml"),
              "--predictor-weights", str(tmp_path / "last.ckpt"), "--template", "internlm2-chat",
              "--image-token", "<IMG_CONTEXT>", "--tiling", "internvl", "--max-tiles", "2",
              "--question-file", str(tmp_path / "q.jsonl"), "--image-folder", str(tmp_path / "images"),
              "--max-new-tokens", "3", "--device", "cpu", "--dtype", "float32"]
    main([*common, "--answers-file", str(tmp_path / "whole.jsonl")])
    assert "3 questions" in capsys.readouterr().out
    for i in range(2):
        main([*common, "--answers-file", str(tmp_path / f"a.{i}.jsonl"), "--num-chunks", "2", "--chunk-idx", str(i)])
    out = capsys.readouterr().out
    assert "2 questions" in out and "1 questions" in out and "prefill" in out and "peak KV cache" in out
    main(["--answers-file", str(tmp_path / "merged.jsonl"), "--merge", str(tmp_path / "a.0.jsonl"), str(tmp_path / "a.1.jsonl")])

    def read(name: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]

    whole, merged = read("whole.jsonl"), read("merged.jsonl")
    assert [a["question_id"] for a in merged] == [1, 2, 3] and all(a["model_id"] == "ckpt" for a in merged)
    assert [a["text"] for a in merged] == [a["text"] for a in whole]
    dense_args = [a for a in common if a not in (str(tmp_path / "sparsify.yaml"), str(tmp_path / "last.ckpt"),
                                                 "--sparsify", "--predictor-weights")]
    main([*dense_args, "--answers-file", str(tmp_path / "dense.jsonl")])
    kept = [[a["metadata"]["prefill_kept"] for a in read(name)] for name in ("whole.jsonl", "dense.jsonl")]
    assert kept[0][0] < kept[1][0] and kept[0][2] < kept[1][2] and kept[0][1] == kept[1][1]  # image tokens removed
    with pytest.raises(SystemExit, match="predictor-weights"):
        main([*dense_args, "--sparsify", str(tmp_path / "sparsify.yaml"), "--answers-file", str(tmp_path / "x.jsonl")])
