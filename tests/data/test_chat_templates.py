"""The tokenizer's own chat template (``template.name: tokenizer``): token ids equal the family's own
rendering, labels only on assistant replies, and the cases where no label mask could be right refused.

The templates below are written for these tests in the shape of each family's published template:
``QWEN2_VL`` (ChatML, a default system prompt, images written by the template as
``<|vision_start|><|image_pad|><|vision_end|>``), ``CHATML_INTERNVL`` (the text-only ChatML template of an
InternVL 2.5 tokenizer, with InternVL 2.5's system prompt: images are ``<image>`` placeholders the data
pipeline wraps in ``<img>...</img>``), ``LLAMA3`` (BOS written by the template, replies trimmed, ``<|eot_id|>``).
"""
import numpy as np
import pytest

from omnibal_pl.batch import IGNORE_INDEX
from omnibal_pl.data import ChatTokenizer, TemplateConfig, load_tokenizer
from omnibal_pl.data.templates import INTERNVL_25_SYSTEM
from omnibal_pl.errors import ConfigError, DataError
from tests.data.golden_tokenizers import byte_level_bpe

transformers = pytest.importorskip("transformers")

EXTRA = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|start_header_id|>", "<|end_header_id|>",
         "<|eot_id|>", "<|begin_of_text|>"]


def _content(var: str) -> str:
    """Jinja writing ``var`` (a string, or text and image parts) with ``image`` for an image part."""
    return (f"{{% if {var} is string %}}{{{{ {var} }}}}{{% else %}}{{% for p in {var} %}}{{% if p['type'] == 'image' %}}"
            f"<|vision_start|><|image_pad|><|vision_end|>{{% else %}}{{{{ p['text'] }}}}{{% endif %}}{{% endfor %}}{{% endif %}}")


QWEN2_VL = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
            "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n" + _content("m['content']") +
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATML_INTERNVL = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
                   + INTERNVL_25_SYSTEM + "<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                   "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
          "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

FAMILIES = {  # template, image context token, image_start, image_end, the reply's end marker
    "qwen2_vl": (QWEN2_VL, "<|image_pad|>", None, None, "<|im_end|>"),
    "internvl2_5": (CHATML_INTERNVL, "<IMG_CONTEXT>", "<img>", "</img>", "<|im_end|>"),
    "llama3": (LLAMA3, "<image>", None, None, "<|eot_id|>"),
}

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
    {"role": "assistant", "content": "A cat."},
    {"role": "user", "content": "Is it red?"},
    {"role": "assistant", "content": "Yes, it is red.\n"},
]
TILES = [2]


def tokenizer_folder(path, template: str, adds_bos: bool = False):
    """A transformers tokenizer folder with ``template``; ``adds_bos``: its encodings start with BOS (as
    Llama 3's do), which the template also writes, so a BOS added again would show twice."""
    from transformers import PreTrainedTokenizerFast

    from tokenizers import AddedToken
    from tokenizers.processors import TemplateProcessing

    raw = byte_level_bpe()
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in EXTRA])
    if adds_bos:
        bos = raw.token_to_id("<|begin_of_text|>")
        raw.post_processor = TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|begin_of_text|>", eos_token="<|im_end|>")
    hf.chat_template = template
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    template, context, start, end, marker = FAMILIES[request.param]
    tok = load_tokenizer(tokenizer_folder(tmp_path_factory.mktemp(request.param), template, request.param == "llama3"))
    cfg = TemplateConfig(name="tokenizer", tokens_per_tile=3, image_context_token=context, image_start=start, image_end=end)
    return request.param, tok, ChatTokenizer(tok, cfg), marker


def expected_ids(tok, name: str, messages, tiles, add_generation_prompt: bool = False) -> list[int]:
    """The family's own rendering, tokenised by transformers, each image's context token expanded as its
    processor does (InternVL: the ``<image>`` placeholder becomes ``<img>`` + context tokens + ``</img>``)."""
    hf = tok.backend
    if name == "internvl2_5":
        text = [{**m, "content": m["content"] if isinstance(m["content"], str) else "<image>What is this?"} for m in messages]
        rendered = hf.apply_chat_template(text, tokenize=False, add_generation_prompt=add_generation_prompt)
        blocks = iter("<img>" + "<IMG_CONTEXT>" * 3 * t + "</img>" for t in tiles)
        pieces = rendered.split("<image>")
        rendered = pieces[0] + "".join(next(blocks) + p for p in pieces[1:])
        return hf(rendered, add_special_tokens=False)["input_ids"]
    if name == "llama3":
        text = [{**m, "content": m["content"] if isinstance(m["content"], str) else "<image>What is this?"} for m in messages]
        ids = hf.apply_chat_template(text, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt)
    else:
        ids = hf.apply_chat_template(messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt)
    context = hf.convert_tokens_to_ids("<|image_pad|>" if name == "qwen2_vl" else "<image>")
    counts = iter(3 * t for t in tiles)
    return [x for i in ids for x in ([i] * next(counts) if i == context else [i])]


def supervised_runs(tok, ids: np.ndarray, labels: np.ndarray) -> list[str]:
    """The decoded runs of consecutive supervised tokens."""
    runs, current = [], []
    for i, lab in zip(ids.tolist(), labels.tolist()):
        if lab != IGNORE_INDEX:
            assert lab == i
            current.append(i)
        elif current:
            runs, current = runs + [current], []
    runs += [current] if current else []
    return [tok.backend.decode(r, skip_special_tokens=False) for r in runs]


def test_ids_equal_the_familys_own_rendering_and_only_replies_are_supervised(family):
    name, tok, chat, marker = family
    ids, labels = chat(MESSAGES, TILES, "t")
    assert ids.tolist() == expected_ids(tok, name, MESSAGES, TILES)
    # each reply with its end marker; not the newline after it, not "assistant\n", not the prompt
    assert supervised_runs(tok, ids, labels) == [f"A cat.{marker}", f"Yes, it is red.{'' if name == 'llama3' else chr(10)}{marker}"]
    assert labels[0] == IGNORE_INDEX


def test_generation_stops_at_the_templates_end_of_turn(family):
    _, tok, chat, marker = family
    assert chat.end_of_turn_id == tok.token_id(marker)


def test_bos_comes_from_the_template_only(family):
    name, tok, chat, _ = family
    ids, _ = chat(MESSAGES, TILES, "t")
    bos = tok.token_id("<|begin_of_text|>")
    assert tok.bos_ids == ([bos] if name == "llama3" else [])
    assert (ids == bos).sum() == (1 if name == "llama3" else 0)


def test_the_hand_format_equals_the_tokenizers_chatml_template(tmp_path):
    """InternVL 2.5's hand format and a ChatML template with its system prompt give the same ids and labels,
    images and multi-turn included."""
    tok = load_tokenizer(tokenizer_folder(tmp_path, CHATML_INTERNVL))
    common = dict(tokens_per_tile=2, image_context_token="<IMG_CONTEXT>")
    hand = ChatTokenizer(tok, TemplateConfig(name="internvl2_5", **common))
    ours = ChatTokenizer(tok, TemplateConfig(name="tokenizer", image_start="<img>", image_end="</img>", **common))
    conv = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "\n\nA cat."},
            {"from": "human", "value": "And <image>?"}, {"from": "gpt", "value": " Yes. "}]
    for a, b in zip(hand(conv, [2, 1], "t"), ours(conv, [2, 1], "t")):
        assert a.tolist() == b.tolist()


def test_tool_turns_are_written_and_not_supervised(tmp_path):
    tok = load_tokenizer(tokenizer_folder(tmp_path, QWEN2_VL))
    chat = ChatTokenizer(tok, TemplateConfig(name="tokenizer", tokens_per_tile=1, image_context_token="<|image_pad|>"))
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "call it"},
            {"role": "tool", "content": "red"}, {"role": "assistant", "content": "Red."}]
    ids, labels = chat(conv, [], "t")
    assert "<|im_start|>tool\nred<|im_end|>" in tok.backend.decode(ids.tolist())
    assert supervised_runs(tok, ids, labels) == ["call it<|im_end|>", "Red.<|im_end|>"]


def test_system_message_of_the_config_replaces_the_templates_default(tmp_path):
    tok = load_tokenizer(tokenizer_folder(tmp_path, QWEN2_VL))
    cfg = TemplateConfig(name="tokenizer", tokens_per_tile=1, image_context_token="<|image_pad|>", system_message="Be brief.")
    ids, _ = ChatTokenizer(tok, cfg)([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}], [], "t")
    assert tok.backend.decode(ids.tolist()).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")


def test_generation_prompt_is_the_familys_own(family):
    """What generation feeds the model: the template's render with its generation prompt (which may tokenise
    differently from the same text followed by a reply, e.g. a trailing "\\n\\n")."""
    name, tok, chat, _ = family
    prompt = chat.generation_prompt(MESSAGES[:2], TILES, "t")
    assert prompt == expected_ids(tok, name, MESSAGES[:2], TILES, add_generation_prompt=True)
    ids, labels = chat(MESSAGES[:3], TILES, "t")
    if name != "llama3":  # ChatML: the prompt ends in a special token, so it is a prefix of the trained sequence
        assert prompt == ids[: int(np.flatnonzero(labels != IGNORE_INDEX)[0])].tolist()


def test_templates_that_cannot_give_a_right_mask_are_refused(tmp_path):
    def chat_with(template: str, folder: str) -> ChatTokenizer:
        tok = load_tokenizer(tokenizer_folder(tmp_path / folder, template))
        return ChatTokenizer(tok, TemplateConfig(name="tokenizer", tokens_per_tile=1, image_context_token="<IMG_CONTEXT>"))

    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Red."},
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]
    # the last reply is written differently from the earlier ones: earlier renders are not prefixes
    last_differs = ("{% for m in messages %}{% if loop.last and m['role'] == 'assistant' %}[final]{% endif %}"
                    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
                    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(DataError, match="t: the chat template writes turns before message 1 differently"):
        chat_with(last_differs, "a")(conv, [], "t")
    rewrites = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(DataError, match="does not write message 1's content as it is"):
        chat_with(rewrites, "b")(conv, [], "t")
    no_prompt = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
    with pytest.raises(ConfigError, match="adds no generation prompt"):
        chat_with(no_prompt, "c")
    with pytest.raises(DataError, match="1 '<image>' placeholders but 2 images"):
        chat_with(CHATML_INTERNVL, "d")([{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Red."}],
                                        [1, 1], "t")


def test_a_tokenizer_without_template_is_refused_by_name(tmp_path):
    from tests.helpers import make_tokenizer

    tok = load_tokenizer(make_tokenizer(tmp_path / "t"))
    with pytest.raises(DataError, match="has no chat template; give a tokenizer folder"):
        ChatTokenizer(tok, TemplateConfig(name="tokenizer", tokens_per_tile=1))


def test_image_wrappers_are_refused_where_the_template_writes_images(tmp_path):
    tok = load_tokenizer(tokenizer_folder(tmp_path, QWEN2_VL))
    with pytest.raises(ConfigError, match="writes an image itself as '<\\|vision_start\\|><\\|image_pad\\|><\\|vision_end\\|>'"):
        ChatTokenizer(tok, TemplateConfig(name="tokenizer", tokens_per_tile=1, image_context_token="<|image_pad|>",
                                          image_start="<|vision_start|>"))
    with pytest.raises(ConfigError, match="hand format 'internvl2_5' writes its own image wrappers"):
        TemplateConfig(name="internvl2_5", image_start="<img>")
