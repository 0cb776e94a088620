import pytest

from omnibal_pl.data import ChatTokenizer, TemplateConfig, load_tokenizer
from omnibal_pl.batch import IGNORE_INDEX
from omnibal_pl.errors import ConfigError, DataError
from tests.helpers import INTERNVL_TEMPLATE, LLAVA_TEMPLATE, conversation, make_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_tokenizer(tmp_path_factory.mktemp("tok")))


def _supervised_text(tok, ids, labels):
    return [tok.backend.id_to_token(int(i)) for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]


def test_load_tokenizer_from_file_and_folder(tmp_path):
    folder = make_tokenizer(tmp_path / "t")
    a, b = load_tokenizer(folder), load_tokenizer(folder / "tokenizer.json")
    assert a.encode("a red cat") == b.encode("a red cat") and len(a.encode("a red cat")) == 3
    assert a.token_id("<IMG_CONTEXT>") == 7
    with pytest.raises(DataError, match="no such tokenizer path"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(DataError, match="not in the vocabulary"):
        a.token_id("<nope>")


def test_load_tokenizer_through_transformers(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(make_tokenizer(tmp_path / "t") / "tokenizer.json"))
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").rename(tmp_path / "hf" / "moved.json")  # force the AutoTokenizer path
    with pytest.raises(DataError, match="transformers cannot load"):
        load_tokenizer(tmp_path / "hf")


@pytest.mark.parametrize("template, reply_end", [(INTERNVL_TEMPLATE, "<|im_end|>"), (LLAVA_TEMPLATE, "</s>")])
def test_labels_cover_exactly_the_replies(tok, template, reply_end):
    chat = ChatTokenizer(tok, template)
    ids, labels = chat(conversation(), [3], "t")
    assert ids.dtype.name == "int64" and ids.shape == labels.shape
    assert ids[0] == tok.token_id("<s>") and labels[0] == IGNORE_INDEX
    sup = _supervised_text(tok, ids, labels)
    assert sup == ["a", "red", "cat", reply_end] + "the cat is red and the dog is blue".split() + [reply_end]
    # supervised positions carry their own ids
    assert all(labels[k] == ids[k] for k in range(len(ids)) if labels[k] != IGNORE_INDEX)


def test_image_expansion(tok):
    chat = ChatTokenizer(tok, INTERNVL_TEMPLATE)
    ids, labels = chat(conversation(images=2), [5, 1], "t")
    ctx = tok.token_id("<IMG_CONTEXT>")
    assert (ids == ctx).sum() == INTERNVL_TEMPLATE.tokens_per_tile * 6
    assert (ids == tok.token_id("<img>")).sum() == 2 and (ids == tok.token_id("</img>")).sum() == 2
    assert (labels[ids == ctx] == IGNORE_INDEX).all()
    text_only, _ = chat(conversation(images=0), [], "t")
    assert len(ids) - len(text_only) == 6 * 4 + 2 * 2  # context tokens and wrappers, nothing else

    llava = ChatTokenizer(tok, LLAVA_TEMPLATE)
    ids, _ = llava(conversation(), [1], "t")
    assert (ids == tok.token_id("<image>")).sum() == 9
    assert tok.token_id("<img>") not in ids


def test_system_turn_and_system_message(tok):
    chat = ChatTokenizer(tok, TemplateConfig(name="internlm2-chat", tokens_per_tile=4, system_message="hello"))
    ids, _ = chat(conversation(images=0), [], "t")
    assert tok.token_id("hello") in ids[:5]
    ids2, _ = chat([{"from": "system", "value": "world"}] + conversation(images=0), [], "t")
    assert tok.token_id("world") in ids2[:5] and tok.token_id("hello") not in ids2[:5]


def test_bad_conversations(tok):
    chat = ChatTokenizer(tok, INTERNVL_TEMPLATE)
    with pytest.raises(DataError, match=r"f\.json\[3\]: 1 '<image>' placeholders but 2 images"):
        chat(conversation(), [1, 1], "f.json[3]")
    with pytest.raises(DataError, match="2 '<image>' placeholders but 0 images"):
        chat(conversation(images=2), [], "x")
    with pytest.raises(DataError, match="turn 1 is from 'human'"):
        chat([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], [], "x")
    with pytest.raises(DataError, match="empty conversation"):
        chat([], [], "x")
    with pytest.raises(DataError, match="string 'value'"):
        chat([{"from": "human", "value": 3}], [], "x")


def test_bad_template_config():
    with pytest.raises(ConfigError, match="template.name"):
        TemplateConfig(name="chatml")
