"""Chat formats: token ids and label masks exactly as the original training code makes them.

The expected sequences (``GOLDEN``) were derived once by running the originals' own preprocessing on
these conversations with the tokenizers of ``golden_tokenizers`` wrapped as HF fast tokenizers:
InternVL's ``preprocess_internlm`` (``internlm2-chat``) and ``preprocess_internvl2_5``, after its
dataset's ``<image>`` insertion; LLaVA's ``preprocess_multimodal`` + ``preprocess_v1`` (``vicuna_v1``),
each ``IMAGE_TOKEN_INDEX`` replaced by ``tokens_per_tile x tiles`` image tokens. System message
"Be brief.", 2 tokens per tile. Masks: ``x`` = supervised (label == id), ``.`` = -100.
Tokenizers: ``sp`` = SentencePiece-style without a dummy prefix, with BOS (InternLM2-like); ``llama`` =
SentencePiece-style with the legacy dummy prefix and BOS (LLaMA/Vicuna); ``first`` = SentencePiece-style
prefixing only the start of the input (newer LLaMA-family tokenizer.json); ``bytes`` = byte-level, no
BOS (Qwen-like). ``internvl2_5`` is encoded whole where the original encodes turn by turn, and images are
encoded as one context token then expanded: the ``first`` and ``bytes`` sequences show both are
token-identical.
"""
import numpy as np
import pytest

from omnibal_pl.batch import IGNORE_INDEX
from omnibal_pl.data import ChatTokenizer, TemplateConfig, TextTokenizer, load_tokenizer
from omnibal_pl.errors import ConfigError, DataError
from tests.data.golden_tokenizers import byte_level_bpe, sentencepiece_bpe
from tests.helpers import INTERNVL_TEMPLATE, LLAVA_TEMPLATE, conversation, make_tokenizer

TOKENIZERS = {"sp": lambda: sentencepiece_bpe("none"), "llama": lambda: sentencepiece_bpe("every"),
              "first": lambda: sentencepiece_bpe("first"), "bytes": byte_level_bpe}
CONTEXT_TOKEN = {"internlm2-chat": "<IMG_CONTEXT>", "internvl2_5": "<IMG_CONTEXT>", "vicuna_v1": "<image>"}


def human(value):
    return {"from": "human", "value": value}


def gpt(value):
    return {"from": "gpt", "value": value}


# conversation, tiles per image
CASES = {
    "text": ([human("Hi there"), gpt("Hello! Name a color."), human(" Compare them. "), gpt("Red.\n")], []),
    "one": ([human("<image>\nWhat is this?"), gpt("A cat."), human("Is it red?"), gpt("Yes, it is red.\n")], [2]),
    "one_after": ([human("What is this?\n<image>"), gpt(" A cat.")], [3]),
    "missing": ([human("What is this?"), gpt("A cat.")], [1]),
    "two": ([human("<image>\n<image>\nCompare them."), gpt("The first is red.")], [2, 1]),
    "three": ([human("Image-1: <image>\nImage-2: <image>\nWhat is this?"), gpt("Red."), human("And <image>?"), gpt(" Yes. ")],
              [1, 2, 1]),
}

GOLDEN = {
    # the same sequences as tokens (* = supervised), three of them:
    # internlm2-chat / sp / text (values stripped: " Compare them. " and "Red.\n" lose their spaces and newline):
    #   <s> <|im_start|> system <0x0A> Be ▁brief . <|im_end|> <|im_start|> user <0x0A> Hi ▁there <|im_end|>
    #   <|im_start|> assistant <0x0A> Hello* !* ▁Name* ▁a* ▁color* .* <|im_end|>* <|im_start|> user <0x0A>
    #   Compa re ▁them . <|im_end|> <|im_start|> assistant <0x0A> Red* .* <|im_end|>*
    # internvl2_5 / bytes / one (the reply's own newline supervised, the one after <|im_end|> not):
    #   <|im_start|> system Ċ Be Ġbrief . <|im_end|> Ċ <|im_start|> user Ċ <img> <IMG_CONTEXT> x4 </img> Ċ What Ġis
    #   Ġthis ? <|im_end|> Ċ <|im_start|> assistant Ċ A* Ġcat* .* <|im_end|>* Ċ <|im_start|> user Ċ I s Ġit Ġred ?
    #   <|im_end|> Ċ <|im_start|> assistant Ċ Yes* ,* Ġit* Ġis* Ġred* .* Ċ* <|im_end|>* Ċ
    # vicuna_v1 / llama / one (each piece between images encoded on its own: "▁ <0x0A>" after the image):
    #   <s> ▁Be ▁brief . ▁USER : ▁ <image> x4 ▁ <0x0A> What ▁is ▁this ? ▁ASSISTANT : ▁A* ▁cat* .* </s>* ▁USER : ▁ I s
    #   ▁it ▁red ? ▁ASSISTANT : ▁Yes* ,* ▁it* ▁is* ▁red* .* <0x0A>* </s>*
    ('internlm2-chat', 'sp', 'text'): (
        [1, 3, 434, 19, 471, 393, 329, 4, 3, 437, 19, 499, 425, 4, 3, 445, 19, 505, 332, 414, 345, 418, 329, 4, 3,
         437, 19, 479, 465, 402, 329, 4, 3, 445, 19, 498, 329, 4],
        '.................xxxxxxx...........xxx',
    ),
    ('internlm2-chat', 'sp', 'one'): (
        [1, 3, 434, 19, 471, 393, 329, 4, 3, 437, 19, 5, 7, 7, 7, 7, 6, 19, 459, 385, 374, 331, 4, 3, 445, 19, 292,
         377, 329, 4, 3, 437, 19, 300, 284, 386, 380, 331, 4, 3, 445, 19, 468, 330, 386, 385, 380, 329, 4],
        '..........................xxxx............xxxxxxx',
    ),
    ('internlm2-chat', 'sp', 'missing'): (
        [1, 3, 434, 19, 471, 393, 329, 4, 3, 437, 19, 5, 7, 7, 6, 19, 459, 385, 374, 331, 4, 3, 445, 19, 292, 377,
         329, 4],
        '........................xxxx',
    ),
    ('internlm2-chat', 'sp', 'two'): (
        [1, 3, 434, 19, 471, 393, 329, 4, 3, 437, 19, 5, 7, 7, 7, 7, 6, 19, 5, 7, 7, 6, 19, 479, 465, 402, 329, 4, 3,
         445, 19, 489, 407, 385, 380, 329, 4],
        '...............................xxxxxx',
    ),
    ('internlm2-chat', 'sp', 'three'): (
        [1, 3, 434, 19, 471, 393, 329, 4, 3, 437, 19, 300, 278, 266, 272, 270, 333, 319, 328, 265, 5, 7, 7, 6, 19,
         300, 278, 266, 272, 270, 333, 320, 328, 265, 5, 7, 7, 7, 7, 6, 19, 459, 385, 374, 331, 4, 3, 445, 19, 498,
         329, 4, 3, 437, 19, 292, 279, 269, 265, 5, 7, 7, 6, 331, 4, 3, 445, 19, 468, 329, 4],
        '.................................................xxx................xxx',
    ),
    ('internvl2_5', 'bytes', 'text'): (
        [3, 364, 19, 401, 323, 55, 4, 19, 3, 367, 19, 429, 355, 4, 19, 3, 375, 19, 435, 42, 344, 275, 348, 55, 4, 19,
         3, 367, 19, 330, 332, 55, 41, 4, 19, 3, 375, 19, 428, 55, 19, 4, 19],
        '..................xxxxxxx.............xxxx.',
    ),
    ('internvl2_5', 'bytes', 'one'): (
        [3, 364, 19, 401, 323, 55, 4, 19, 3, 367, 19, 5, 7, 7, 7, 7, 6, 19, 389, 315, 304, 72, 4, 19, 3, 375, 19, 74,
         307, 55, 4, 19, 3, 367, 19, 82, 124, 316, 310, 72, 4, 19, 3, 375, 19, 398, 53, 316, 315, 310, 55, 19, 4, 19],
        '...........................xxxx..............xxxxxxxx.',
    ),
    ('internvl2_5', 'bytes', 'missing'): (
        [3, 364, 19, 401, 323, 55, 4, 19, 3, 367, 19, 5, 7, 7, 6, 19, 389, 315, 304, 72, 4, 19, 3, 375, 19, 74, 307,
         55, 4, 19],
        '.........................xxxx.',
    ),
    ('internvl2_5', 'bytes', 'two'): (
        [3, 364, 19, 401, 323, 55, 4, 19, 3, 367, 19, 5, 7, 7, 7, 7, 6, 19, 5, 7, 7, 6, 19, 409, 395, 332, 55, 4, 19,
         3, 375, 19, 419, 337, 315, 310, 55, 4, 19],
        '................................xxxxxx.',
    ),
    ('internvl2_5', 'bytes', 'three'): (
        [3, 364, 19, 401, 323, 55, 4, 19, 3, 367, 19, 82, 118, 106, 112, 110, 54, 58, 67, 41, 5, 7, 7, 6, 19, 82,
         118, 106, 112, 110, 54, 59, 67, 41, 5, 7, 7, 7, 7, 6, 19, 389, 315, 304, 72, 4, 19, 3, 375, 19, 428, 55, 4,
         19, 3, 367, 19, 74, 119, 109, 41, 5, 7, 7, 6, 72, 4, 19, 3, 375, 19, 313, 55, 41, 4, 19],
        '..................................................xxx..................xxxx.',
    ),
    ('internvl2_5', 'sp', 'one'): (
        [1, 3, 434, 19, 471, 393, 329, 4, 19, 3, 437, 19, 5, 7, 7, 7, 7, 6, 19, 459, 385, 374, 331, 4, 19, 3, 445,
         19, 292, 377, 329, 4, 19, 3, 437, 19, 300, 284, 386, 380, 331, 4, 19, 3, 445, 19, 468, 330, 386, 385, 380,
         329, 19, 4, 19],
        '............................xxxx..............xxxxxxxx.',
    ),
    ('vicuna_v1', 'llama', 'text'): (
        [1, 388, 393, 329, 357, 328, 423, 425, 366, 328, 429, 332, 414, 345, 418, 329, 2, 357, 328, 265, 400, 402,
         329, 265, 366, 328, 421, 329, 19, 2],
        '..........xxxxxxx.........xxxx',
    ),
    ('vicuna_v1', 'llama', 'one'): (
        [1, 388, 393, 329, 357, 328, 265, 8, 8, 8, 8, 265, 19, 459, 385, 374, 331, 366, 328, 358, 377, 329, 2, 357,
         328, 265, 300, 284, 386, 380, 331, 366, 328, 383, 330, 386, 385, 380, 329, 19, 2],
        '...................xxxx..........xxxxxxxx',
    ),
    ('vicuna_v1', 'llama', 'one_after'): (
        [1, 388, 393, 329, 357, 328, 265, 8, 8, 8, 8, 8, 8, 265, 19, 459, 385, 374, 331, 366, 328, 265, 358, 377,
         329, 2],
        '.....................xxxxx',
    ),
    ('internlm2-chat', 'first', 'three'): (
        [1, 3, 434, 19, 471, 393, 329, 4, 3, 437, 19, 300, 278, 266, 272, 270, 333, 319, 328, 265, 5, 7, 7, 6, 19,
         300, 278, 266, 272, 270, 333, 320, 328, 265, 5, 7, 7, 7, 7, 6, 19, 459, 385, 374, 331, 4, 3, 445, 19, 498,
         329, 4, 3, 437, 19, 292, 279, 269, 265, 5, 7, 7, 6, 331, 4, 3, 445, 19, 468, 329, 4],
        '.................................................xxx................xxx',
    ),
    ('internvl2_5', 'first', 'text'): (
        [1, 3, 434, 19, 471, 393, 329, 4, 19, 3, 437, 19, 499, 425, 4, 19, 3, 445, 19, 505, 332, 414, 345, 418, 329,
         4, 19, 3, 437, 19, 400, 402, 329, 265, 4, 19, 3, 445, 19, 498, 329, 19, 4, 19],
        '...................xxxxxxx.............xxxx.',
    ),
    ('internvl2_5', 'first', 'three'): (
        [1, 3, 434, 19, 471, 393, 329, 4, 19, 3, 437, 19, 300, 278, 266, 272, 270, 333, 319, 328, 265, 5, 7, 7, 6,
         19, 300, 278, 266, 272, 270, 333, 320, 328, 265, 5, 7, 7, 7, 7, 6, 19, 459, 385, 374, 331, 4, 19, 3, 445,
         19, 498, 329, 4, 19, 3, 437, 19, 292, 279, 269, 265, 5, 7, 7, 6, 331, 4, 19, 3, 445, 19, 383, 329, 265, 4,
         19],
        '...................................................xxx..................xxxx.',
    ),
    ('vicuna_v1', 'first', 'one_after'): (
        [1, 388, 393, 329, 357, 328, 265, 8, 8, 8, 8, 8, 8, 265, 19, 459, 385, 374, 331, 366, 328, 265, 358, 377,
         329, 2],
        '.....................xxxxx',
    ),
}


@pytest.fixture(scope="module")
def toks():
    return {name: TextTokenizer(make()) for name, make in TOKENIZERS.items()}


def chat_for(tok, name, tokens_per_tile=2, system="Be brief."):
    cfg = TemplateConfig(name=name, tokens_per_tile=tokens_per_tile, image_context_token=CONTEXT_TOKEN[name],
                         system_message=system)
    return ChatTokenizer(tok, cfg)


def render(tok, ids, labels):
    return " ".join(tok.backend.id_to_token(int(i)) + ("*" if lab != IGNORE_INDEX else "") for i, lab in zip(ids, labels))


@pytest.mark.parametrize("name, tokenizer, case", sorted(GOLDEN))
def test_golden_tokens_and_labels(toks, name, tokenizer, case):
    tok = toks[tokenizer]
    conv, tiles = CASES[case]
    ids, labels = chat_for(tok, name)(conv, tiles, case)
    want_ids, want_mask = GOLDEN[name, tokenizer, case]
    want_labels = [i if m == "x" else IGNORE_INDEX for i, m in zip(want_ids, want_mask)]
    assert ids.dtype == labels.dtype == np.int64
    assert (ids.tolist(), labels.tolist()) == (want_ids, want_labels), (
        f"\n got  {render(tok, ids, labels)}\n want {render(tok, want_ids, want_labels)}")


def test_whole_prompt_encoding_keeps_the_space_inside_the_first_word(toks):
    # LLaMA-style: "ASSISTANT: A" is "▁ASSISTANT : ▁A", never a lone "▁" before the reply, and the
    # supervised run starts at "▁A" (the token holding the space after "ASSISTANT:")
    tok = toks["llama"]
    ids, labels = chat_for(tok, "vicuna_v1")(CASES["text"][0], [], "t")
    text = render(tok, ids, labels)
    assert "▁ASSISTANT : ▁Hello* !*" in text and "▁USER : ▁Hi ▁there ▁ASSISTANT" in text
    assert len(ids) == 30  # encoding "{system} ", "USER: q ", "ASSISTANT: " and each reply on its own gives 35


def test_a_token_holding_prompt_and_reply_characters_is_not_supervised(toks):
    # "assistant\n" + reply "\n\nRed.": the first two newlines make one token (ĊĊ) holding the prompt's
    # newline; it is not supervised, the rest of the reply is (InternVL's preprocess_internvl2_5 gives the same)
    tok = toks["bytes"]
    ids, labels = chat_for(tok, "internvl2_5")([human("Hi"), gpt("\n\nRed.")], [], "t")
    assert render(tok, ids, labels).endswith("<|im_start|> assistant ĊĊ Ċ* Red* .* <|im_end|>* Ċ")


@pytest.mark.parametrize("name", ["internlm2-chat", "vicuna_v1"])
def test_an_image_inside_a_reply_is_not_supervised(toks, name):
    tok = toks["sp"]
    ids, labels = chat_for(tok, name, tokens_per_tile=1)([human("Hi"), gpt("Red. <image>")], [3], "t")
    text = render(tok, ids, labels)
    block = "<img> <IMG_CONTEXT> <IMG_CONTEXT> <IMG_CONTEXT> </img>" if name == "internlm2-chat" else "<image> <image> <image>"
    # the image block carries no label, the reply around it does (LLaVA moves the image to the front first)
    assert text.endswith(f"Red* .* ▁* {block} <|im_end|>*" if name == "internlm2-chat" else f": ▁* {block} <0x0A>* Red* .* </s>*")


def test_llava_moves_the_image_to_the_front_of_its_turn(toks):
    tok = toks["llama"]
    chat = chat_for(tok, "vicuna_v1", tokens_per_tile=1)
    front, _ = chat([human("<image>\nWhat is this?"), gpt("A cat.")], [1], "a")
    behind, _ = chat([human("  What is this?\n<image> "), gpt("A cat.")], [1], "b")
    assert front.tolist() == behind.tolist()


@pytest.mark.parametrize("name, ends, stop", [("internlm2-chat", "<|im_start|> assistant <0x0A>", "<|im_end|>"),
                                               ("internvl2_5", "<|im_start|> assistant <0x0A>", "<|im_end|>"),
                                               ("vicuna_v1", "▁ASSISTANT :", "</s>")])
def test_generation_prompt_is_the_prompt_a_reply_follows_in_training(toks, name, ends, stop):
    """Generation feeds the prompt as training wrote it before a reply (InternVL's "assistant" with its
    newline) and stops at the format's end marker."""
    tok = toks["llama"] if name == "vicuna_v1" else toks["sp"]
    chat = chat_for(tok, name)
    prompt = chat.generation_prompt([human("<image>\nWhat is this?")], [1], "t")
    assert render(tok, prompt, prompt).replace("*", "").endswith(ends)
    ids, labels = chat([human("<image>\nWhat is this?"), gpt("A cat.")], [1], "t")
    first_label = int(np.flatnonzero(labels != IGNORE_INDEX)[0])
    if name != "vicuna_v1":  # LLaVA's "ASSISTANT: A" shares the token holding the space with the reply
        assert prompt == ids[:first_label].tolist()
    assert chat.end_of_turn_id == tok.token_id(stop)


def test_default_system_messages(toks):
    tok = toks["bytes"]
    v15 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
    v25 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
    for name, system in (("internlm2-chat", v15), ("internvl2_5", v25)):
        ids, _ = chat_for(tok, name, system=None)(CASES["text"][0], [], "t")
        assert tok.backend.decode(ids.tolist(), skip_special_tokens=False).startswith(f"<|im_start|>system\n{system}<|im_end|>")


def test_system_turn_replaces_the_system_message(toks):
    tok = toks["sp"]
    chat = chat_for(tok, "internvl2_5")
    ids, labels = chat([{"from": "system", "value": "Hi there"}, *CASES["missing"][0]], [1], "t")
    assert tok.backend.decode(ids.tolist(), skip_special_tokens=False).startswith("<s><|im_start|>system\nHi there<|im_end|>\n")
    assert labels[0] == IGNORE_INDEX


def test_fast_tokenizer_through_transformers_gives_the_same_sequence(toks):
    from transformers import PreTrainedTokenizerFast

    hf = TextTokenizer(PreTrainedTokenizerFast(tokenizer_object=sentencepiece_bpe("none"), bos_token="<s>"))
    assert hf.bos_ids == toks["sp"].bos_ids == [1] and toks["bytes"].bos_ids == []
    conv, tiles = CASES["three"]
    a = chat_for(hf, "internlm2-chat")(conv, tiles, "t")
    b = chat_for(toks["sp"], "internlm2-chat")(conv, tiles, "t")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_image_context_token_in_the_text_is_refused(toks):
    chat = chat_for(toks["sp"], "internlm2-chat")
    with pytest.raises(DataError, match="holds the image context token"):
        chat([human("<image>\nsee <IMG_CONTEXT>"), gpt("A cat.")], [1], "t")


def test_image_block_must_encode_as_special_tokens():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    plain = Tokenizer(WordLevel({t: i for i, t in enumerate(["<unk>", "<img>", "</img>", "<IMG_CONTEXT>", "hi"])}, "<unk>"))
    plain.pre_tokenizer = Whitespace()  # the image tokens are vocabulary words, not added special tokens
    chat = ChatTokenizer(TextTokenizer(plain, "plain"), TemplateConfig(name="internvl2_5", tokens_per_tile=1))
    with pytest.raises(DataError, match="plain: '<img><IMG_CONTEXT></img>' does not encode as its special tokens"):
        chat([human("<image>\nhi"), gpt("hi")], [1], "t")


def test_missing_image_placeholder_is_inserted_only_by_internvl(toks):
    conv = CASES["missing"][0]
    chat_for(toks["sp"], "internlm2-chat")(conv, [1], "t")  # inserted (golden "missing")
    with pytest.raises(DataError, match=r"f\.json\[3\]: 0 '<image>' placeholders but 1 images"):
        chat_for(toks["llama"], "vicuna_v1")(conv, [1], "f.json[3]")
    with pytest.raises(DataError, match="0 '<image>' placeholders but 2 images"):
        chat_for(toks["sp"], "internlm2-chat")(conv, [1, 1], "t")  # several images: never guessed
    assert conv[0]["value"] == "What is this?"  # the record is not modified


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


def test_bad_conversations(tmp_path):
    tok = load_tokenizer(make_tokenizer(tmp_path / "t"))
    chat = ChatTokenizer(tok, INTERNVL_TEMPLATE)
    with pytest.raises(DataError, match=r"f\.json\[3\]: 1 '<image>' placeholders but 2 images"):
        chat(conversation(), [1, 1], "f.json[3]")
    with pytest.raises(DataError, match="2 '<image>' placeholders but 0 images"):
        chat(conversation(images=2), [], "x")
    with pytest.raises(DataError, match="x: no assistant turn"):
        chat([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], [], "x")
    with pytest.raises(DataError, match="empty conversation"):
        chat([], [], "x")
    with pytest.raises(DataError, match="x: turn 0: content must be a string or a list of parts"):
        chat([{"from": "human", "value": 3}], [], "x")
    with pytest.raises(DataError, match="x: turn 1 has role 'bot'"):
        chat([{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}], [], "x")
    with pytest.raises(DataError, match="the first turn after the system prompt must be the user's, found 'assistant'"):
        chat([{"from": "system", "value": "a"}, {"from": "gpt", "value": "b"}], [], "x")
    with pytest.raises(DataError, match="a system turn after the conversation started"):
        chat([{"from": "human", "value": "a"}, {"from": "system", "value": "b"}, {"from": "gpt", "value": "c"}], [], "x")
    with pytest.raises(DataError, match=r"cannot write \['tool'\] turns; use the tokenizer's own chat template"):
        chat([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}, {"role": "assistant", "content": "c"}], [], "x")
    ChatTokenizer(tok, LLAVA_TEMPLATE)(conversation(), [1], "x")


def test_consecutive_turns_of_one_role_are_written_one_after_the_other(toks):
    tok = toks["bytes"]
    chat = chat_for(tok, "internvl2_5")
    split, split_labels = chat([human("Hi"), human("there"), gpt("Red."), gpt("Yes.")], [], "t")
    assert render(tok, split, split_labels).endswith(
        "<|im_start|> user Ċ Hi <|im_end|> Ċ <|im_start|> user Ċ the re <|im_end|> Ċ <|im_start|> assistant Ċ Red* .* "
        "<|im_end|>* Ċ <|im_start|> assistant Ċ Yes* .* <|im_end|>* Ċ")


def test_bad_template_config():
    with pytest.raises(ConfigError, match="template.name"):
        TemplateConfig(name="chatml")
