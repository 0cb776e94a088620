"""omnibal-eval: file handling (LLaVA layouts, chunks, merge), statistics and input errors."""
import json

import pytest
import torch

from omnibal_pl.cli.eval import answer_questions, get_chunk, load_sparsify, main, prompt_batch, read_questions, write_answers
from omnibal_pl.errors import DataError
from omnibal_pl.model import VLM
from tests.test_sparsify_model import tiny_cfg


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

