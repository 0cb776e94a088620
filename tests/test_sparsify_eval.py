"""omnibal-eval file handling (LLaVA layouts, chunks, merge) and the sparsify config group composition."""
import json
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from omnibal_pl.cli.eval import answer_questions, get_chunk, load_sparsify, main, prompt_batch, read_questions, write_answers
from omnibal_pl.errors import DataError
from omnibal_pl.model import VLM, VLMConfig
from omnibal_pl.model.sparsify import SparsifyConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny():
    data = yaml.safe_load((ROOT / "conf" / "model" / "tiny.yaml").read_text())
    data["sparsify"] = {**yaml.safe_load((ROOT / "conf/model/sparsify/dynamic_llava.yaml").read_text()),
                        "sparse_layer": 1, "predictor_dim": 32, "predictor_heads": 4, "predictor_mlp_dim": 64}
    torch.manual_seed(0)
    return VLM(VLMConfig.from_dict(data)).eval()


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


def test_sparsify_group_composes_with_any_model_and_the_experiment(tmp_path):
    (tmp_path / "root.yaml").write_text(
        "defaults:\n  - model: tiny\n  - model/sparsify: \"off\"\n  - _self_\n"
        f"hydra:\n  searchpath:\n    - file://{ROOT / 'conf'}\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        off = compose("root")
        on = compose("root", overrides=["model/sparsify=dynamic_llava", "model=internvl2_2b"])
        exp = compose("root", overrides=["+experiment=dynamic_llava_7b"])
    assert VLMConfig.from_dict(off.model).sparsify == SparsifyConfig()
    assert VLMConfig.from_dict(on.model).sparsify == SparsifyConfig(enabled=True)
    model = VLMConfig.from_dict(exp.model)
    assert model.name == "llava_1_5_7b" and model.sparsify.enabled and model.sparsify.vision_keep_rate == 0.2
    assert exp.optim.lr == 5e-6 and exp.optim.predictor_lr == 2e-4 and list(exp.optim.freeze) == ["vision"]
    assert exp.trainer.max_epochs == 1 and exp.data.global_batch_size == 64
    # every knob of the dataclass is exposed in both options
    knobs = {f for f in SparsifyConfig.__dataclass_fields__}
    for option in ("off", "dynamic_llava"):
        assert set(yaml.safe_load((ROOT / f"conf/model/sparsify/{option}.yaml").read_text())) == knobs
