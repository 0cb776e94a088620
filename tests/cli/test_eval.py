"""omnibal-eval: file handling (LLaVA layouts, chunks, merge), statistics and input errors."""
import json
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_module

from omnibal_pl.cli.eval import answer_questions, get_chunk, load_sparsify, main, prompt_batch, read_questions, write_answers
from omnibal_pl.cli.export import export
from omnibal_pl.cli.train import train
from omnibal_pl.cli.vqa import normalize_answer, vqa_accuracy, vqa_score
from omnibal_pl.conf import preset
from omnibal_pl.errors import DataError
from omnibal_pl.model import VLM
from omnibal_pl.model.sparsify import SparsifyConfig
from tests.helpers import (FAST, SMALL_PREDICTOR, cfg_of, internvl_model, make_image, make_tokenizer, tiny_cfg,
                           write_internvl_checkpoint, write_jsonl)

ROOT = Path(__file__).resolve().parents[1]


def compose_export(*overrides: str):
    with initialize_config_module(config_module="omnibal_pl.conf", version_base="1.3"):
        return compose(config_name="export", overrides=list(overrides))


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


# ---------------------------------------------------------------- VQA accuracy, and an exported fine-tune


@pytest.mark.parametrize("raw, normalised", [
    ("Two.", "2"), ("The Dog!", "dog"), ("yes,", "yes"), ("3.5", "3.5"), ("1,000", "1000"), ("dont know", "don't know"),
    ("a red\tcat", "red cat"), ("black-and-white", "black and white"), ("(none)", "0"),
])
def test_vqa_normalisation(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_vqa_scores():
    assert vqa_score("Two dogs.", ["2 dogs"]) == 1.0 and vqa_score("two", ["three"]) == 0.0
    assert vqa_score("yes", ["yes", "yes", "no", "Yes!", "no"]) == 1.0  # 3 matches of 5 references
    assert vqa_score("no", ["yes", "yes", "no", "Yes!", "no"]) == pytest.approx(2 / 3)
    questions = [{"answer": "cat"}, {"answers": [{"answer": "dog"}]}, {"text": "no reference"}, {"answer": "red"}]
    assert vqa_accuracy(questions, ["The cat.", "cat", "anything", "red"]) == (pytest.approx(2 / 3), 3)


@pytest.mark.timeout(300)
def test_eval_scores_an_exported_fine_tune_in_one_batch(tmp_path, capsys):
    """train 3 steps from an InternVL-Chat folder -> omnibal-export -> omnibal-eval answers 4 questions in one batch
    and scores the 2 that carry the answers it gives (a batched answer that differed from the single one would
    change the score)."""
    source = tmp_path / "source"
    source.mkdir()
    write_internvl_checkpoint(internvl_model("Qwen2ForCausalLM"), source, "Qwen2ForCausalLM")
    make_tokenizer(source)
    train(cfg_of(*FAST, "trainer.max_steps=3", "model=auto", f"init_from={source}", f"run_dir={tmp_path / 'run'}"))
    export(compose_export(f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", f"target={tmp_path / 'hf'}"))
    make_image(tmp_path / "images" / "cat.jpg", 60, 40)
    questions = [{"question_id": 1, "image": "cat.jpg", "text": "what is this"},
                 {"question_id": 2, "text": "describe the dog"},
                 {"question_id": 3, "image": "cat.jpg", "text": "is it red"},
                 {"question_id": 4, "text": "hello world"}]
    common = ["--model-path", str(tmp_path / "hf"), "--template", "internlm2-chat", "--image-token", "<IMG_CONTEXT>",
              "--tiling", "internvl", "--max-tiles", "2", "--image-folder", str(tmp_path / "images"),
              "--max-new-tokens", "3", "--device", "cpu", "--dtype", "float32"]
    write_jsonl(tmp_path / "q.jsonl", questions)
    main([*common, "--question-file", str(tmp_path / "q.jsonl"), "--answers-file", str(tmp_path / "single.jsonl")])
    single = [json.loads(line)["text"] for line in (tmp_path / "single.jsonl").read_text().splitlines()]
    scored = [{**questions[0], "answer": single[0]}, questions[1], {**questions[2], "answer": single[2] + " x"},
              {**questions[3], "answers": [single[3]]}]
    write_jsonl(tmp_path / "scored.jsonl", scored)
    capsys.readouterr()
    main([*common, "--question-file", str(tmp_path / "scored.jsonl"), "--answers-file", str(tmp_path / "batch.jsonl"),
          "--batch-size", "4"])
    out = capsys.readouterr().out
    assert "4 questions" in out and "VQA accuracy 66.67% over 3 questions" in out, out
