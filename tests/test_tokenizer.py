"""Tests for idlm.tokenizer: our Tokenizer must agree with transformers (the oracle) on ids,
decoded text and chat-template rendering, for a tiny BPE trained here and for the real SmolLM2
GGUF; the incremental detokenizer must reproduce decode() exactly; bad input raises TokenizerError.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from tiny import write_tiny_tokenizer
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from idlm.errors import TokenizerError
from idlm.tokenizer import IncrementalDetokenizer, Tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Wie geht's? 你好 🙂"},
    {"role": "assistant", "content": "Fine, thanks: 42."},
    {"role": "user", "content": "And tomorrow?"},
]
TEXTS = [
    "Hello world",
    "  leading and trailing spaces  ",
    "naïve café déjà vu — Ünïcödé",
    "数字 and 中文字符 mixed with English",
    "emoji 🙂👍🏽 and family 👨‍👩‍👧",
    "digits 12345 and 3.14159 and 2024-06-01",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "tabs\tand\nnewlines\r\n",
    "",
]
MULTIBYTE_TEXTS = [
    "你好，世界！这是一个测试。", "🙂🙃😀 emoji 👍🏽👨‍👩‍👧", "àéîõü ñ ç ß ø å", "mixed 中文 and ascii 123 ✓",
]
SMOL_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café déjà vu — Ünïcödé",
    "你好，世界 🙂👍🏽",
    "  indented\n\tcode(x) -> y  ",
    "<|im_start|>user\nWhat is a diffusion model?<|im_end|>\n",
]


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiny_dir)


# ---------------------------------------------------------------------------------------------
# 1. tiny trained tokenizer vs transformers


def test_from_dir_round_trip_and_special_ids(tiny):
    for text in TEXTS:
        assert tiny.decode(tiny.encode(text)) == text
    assert tiny.encode("<|im_end|>") == [tiny.token_to_id("<|im_end|>")]
    assert tiny.mask_token_id == tiny.token_to_id("<|MASK|>") == 3
    assert tiny.eos_token_id == tiny.token_to_id("<|im_end|>")
    assert tiny.eos_token_ids == frozenset({tiny.token_to_id("<|im_end|>"), tiny.token_to_id("<|endoftext|>")})
    assert tiny.pad_token_id == 0 and tiny.bos_token_id is None
    assert len(tiny) == tiny.vocab_size == 600
    assert tiny.id_to_token(2) == "<|im_end|>" and tiny.token_to_id("no-such-token") is None
    assert tiny.decode(tiny.encode("a<|im_end|>b"), skip_special_tokens=True) == "ab"


def test_config_files_add_stop_ids_and_mask(tmp_path):
    templates = [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]
    d = write_tiny_tokenizer(tmp_path, chat_template=templates, add_bos_token=True,
                             bos_token={"content": "<|im_start|>"})
    (d / "config.json").write_text(json.dumps({"eos_token_id": 1, "mask_token_id": 0}))
    tok = Tokenizer.from_dir(d)
    assert tok.chat_template == "D"
    assert tok.eos_token_ids == frozenset({0, 1, 2}) and tok.eos_token_id == 2
    assert tok.mask_token_id == 0
    assert tok.encode("hi", add_special_tokens=True)[0] == 1 and tok.encode("hi")[0] != 1
    (d / "chat_template.jinja").write_text("J")
    assert Tokenizer.from_dir(d).chat_template == "J"


def test_bos_follows_post_processor_and_survives_save(tmp_path):
    transformers = pytest.importorskip("transformers")
    d = write_tiny_tokenizer(tmp_path / "src", bos_token="<|im_start|>")
    backend = HFTokenizer.from_file(str(d / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    backend.save(str(d / "tokenizer.json"))
    assert Tokenizer.from_dir(d).encode("hi", add_special_tokens=True)[0] == 1  # no add_bos_token: post-processor
    for add_bos in (True, False):
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": add_bos}))
        ours = Tokenizer.from_dir(d)
        ours.save(tmp_path / f"out{add_bos}")
        hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / f"out{add_bos}"))
        assert hf("hi there")["input_ids"] == ours.encode("hi there", add_special_tokens=True)
        assert (ours.encode("hi", add_special_tokens=True)[0] == 1) == add_bos


def test_save_loads_in_transformers_identically(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    tiny.save(tmp_path / "saved")
    assert sorted(os.listdir(tmp_path / "saved")) == ["tokenizer.json", "tokenizer_config.json"]
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    ours = Tokenizer.from_dir(tmp_path / "saved")
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == tiny.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text
        assert hf.decode(ids) == ours.decode(ids) == text
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids, skip_special_tokens=True)
    assert hf.eos_token_id == ours.eos_token_id and hf.pad_token_id == ours.pad_token_id
    for gen in (True, False):
        want = hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(CONVERSATION, add_generation_prompt=gen) == want
        assert tiny.apply_chat_template(CONVERSATION, add_generation_prompt=gen) == want
        hf_ids = hf.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=gen, return_dict=False)
        assert ours.encode_chat(CONVERSATION, add_generation_prompt=gen) == list(hf_ids)


def test_template_features_match_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
        "{{ m.role | upper }}: {{ m.content }}{{ eos_token }}\n{% endfor %}"
        "{% if tools is not none %}TOOLS {{ tools | tojson(indent=2) }}{% endif %}{{ extra | default('') }}"
        "{% if unk_token is defined %}UNK{% endif %}"
    )
    d = write_tiny_tokenizer(tmp_path / "src", chat_template=template, bos_token="<|im_start|>",
                             add_bos_token=True)
    ours = Tokenizer.from_dir(d)
    ours.save(tmp_path / "out")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    msgs = [{"role": "user", "content": "é 🙂"}, {"role": "skip", "content": "x"},
            {"role": "assistant", "content": "ok", "name": None}]
    tools = [{"name": "f", "description": "ünï"}]
    for kwargs in ({}, {"tools": tools, "extra": "E"}):
        want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False, **kwargs)
        assert ours.apply_chat_template(msgs, add_generation_prompt=False, **kwargs) == want
    for text in ("hi there", "x"):
        assert ours.encode(text, add_special_tokens=True) == hf(text)["input_ids"]


# ---------------------------------------------------------------------------------------------
# 2. the real SmolLM2 GGUF vs transformers' GGUF loader


@pytest.fixture(scope="module")
def smol_pair(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    from idlm.models.gguf import gguf_metadata, open_gguf

    path = Path(smollm2_gguf)  # the session fixture in tests/conftest.py
    ours = Tokenizer.from_gguf_metadata(gguf_metadata(open_gguf(path)))
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return ours, hf


def test_gguf_tokenizer_matches_transformers(smol_pair):
    ours, hf = smol_pair
    assert ours.vocab_size == len(hf) == 49152
    for text in SMOL_TEXTS:
        ids = ours.encode(text)
        assert ids == hf(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ids) == hf.decode(ids) == text
        assert ours.encode(text, add_special_tokens=True) == hf(text)["input_ids"]
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert ours.id_to_token(2) == "<|im_end|>" and 2 in ours.eos_token_ids
    assert ours.mask_token_id is None and ours.model_max_length == 8192
    for gen in (True, False):
        for conv in (CONVERSATION, CONVERSATION[1:]):
            want = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(conv, add_generation_prompt=gen) == want


def test_detokenizer_on_real_vocab(smol_pair):
    ours, _ = smol_pair
    rng = random.Random(7)
    for ids in [ours.encode(t) for t in MULTIBYTE_TEXTS] + [[rng.randrange(49152) for _ in range(200)]]:
        assert "".join(_stream(ours, ids)) == ours.decode(ids)


def test_gguf_tokenizer_splits_digits(smol_pair):
    ours, _ = smol_pair
    ids = ours.encode("12345")
    assert [ours.decode([i]) for i in ids] == list("12345")
    pieces = [ours.decode([i]) for i in ours.encode("year 2024 cost $3.50")]
    assert all(len(p.strip()) <= 1 for p in pieces if any(c.isdigit() for c in p))


def test_gguf_save_round_trips_through_transformers(smol_pair, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours, _ = smol_pair
    ours.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in SMOL_TEXTS + ["digits 12345 and 3.14"]:
        assert hf(text)["input_ids"] == ours.encode(text, add_special_tokens=True), text
    assert hf.apply_chat_template(CONVERSATION, tokenize=False) == ours.apply_chat_template(CONVERSATION, False)


def test_gguf_rejects_unsupported_models():
    with pytest.raises(TokenizerError, match="'llama'.*unsupported"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(TokenizerError, match="tokenizer.ggml.merges"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]})


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "smollm", "default", "something-new"])
def test_gguf_minimal_vocab(pre):
    tokens = ["<s>", "</s>", "<u>", "a", "b", "ab"]
    tok = Tokenizer.from_gguf_metadata({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.token_type": [3, 3, 4, 1, 1, 1],
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.eot_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
    })
    assert tok.encode("ab<u></s>", add_special_tokens=True) == [0, 5, 2, 1]
    assert tok.decode([5, 1, 2], skip_special_tokens=True) == "ab<u>"  # user-defined tokens are not special
    assert tok.eos_token_ids == frozenset({0, 1}) and tok.chat_template is None


# ---------------------------------------------------------------------------------------------
# 3. incremental detokenizer


def _stream(tok: Tokenizer, ids: list[int], skip: bool = False) -> list[str]:
    det = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    return [det.add(i) for i in ids] + [det.flush()]


@pytest.mark.parametrize("skip", [False, True])
def test_detokenizer_random_ids(tiny, skip):
    rng = random.Random(1234)
    for _ in range(30):
        ids = [rng.randrange(tiny.vocab_size) for _ in range(rng.randint(1, 120))]
        deltas = _stream(tiny, ids, skip)
        full = tiny.decode(ids, skip_special_tokens=skip)
        assert "".join(deltas) == full
        if "\ufffd" not in full:
            assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("skip", [False, True])
def test_detokenizer_add_many_gives_the_same_text_in_any_chunking(tiny, skip):
    """A decode step adds its committed tokens at once (`add_many`: two window decodes per step): each
    chunk of 1-6 ids returns exactly the text that adding its ids one by one returns, random ids (invalid
    byte sequences too) and multibyte text alike."""
    rng = random.Random(7)
    streams = [[rng.randrange(tiny.vocab_size) for _ in range(rng.randint(1, 120))] for _ in range(20)]
    streams += [tiny.encode(t) for t in MULTIBYTE_TEXTS + TEXTS]
    for ids in streams:
        det = IncrementalDetokenizer(tiny, skip_special_tokens=skip)
        one = IncrementalDetokenizer(tiny, skip_special_tokens=skip)
        i = 0
        while i < len(ids):
            chunk = ids[i: i + rng.randint(1, 6)]
            assert det.add_many(chunk) == "".join(one.add(t) for t in chunk)
            i += len(chunk)
        assert det.flush() == one.flush()
    assert IncrementalDetokenizer(tiny).add_many([]) == ""


def test_detokenizer_multibyte_text(tiny):
    for text in MULTIBYTE_TEXTS + TEXTS:
        ids = tiny.encode(text)
        deltas = _stream(tiny, ids)
        assert "".join(deltas) == text
        assert not any("\ufffd" in d for d in deltas)
        assert deltas[-1] == ""  # nothing left unfinished on valid text


def test_detokenizer_decodes_a_small_window(tiny):
    ids = tiny.encode(" ".join(MULTIBYTE_TEXTS) * 20)
    seen: list[int] = []
    decode = tiny.decode

    class Spy:  # stands in for the Tokenizer and its backend, recording each decoded window
        backend = property(lambda self: self)

        def get_added_tokens_decoder(self):
            return tiny.backend.get_added_tokens_decoder()

        def decode(self, window, skip_special_tokens=False):
            seen.append(len(window))
            return decode(window, skip_special_tokens=skip_special_tokens)

    det = IncrementalDetokenizer(Spy())  # type: ignore[arg-type]
    assert "".join(det.add(i) for i in ids) + det.flush() == tiny.decode(ids)
    assert len(ids) > 500 and max(seen) <= 8
    # skipped special tokens (a model running past EOS) never widen the window
    special = sorted(tiny.eos_token_ids)[0]
    with_specials = ids[:50] + [special] * 300 + ids[50:100]
    seen.clear()
    det = IncrementalDetokenizer(Spy(), skip_special_tokens=True)  # type: ignore[arg-type]
    text = "".join(det.add(i) for i in with_specials) + det.flush()
    assert text == tiny.decode(with_specials, skip_special_tokens=True) and max(seen) <= 8


# ---------------------------------------------------------------------------------------------
# 4. errors


def test_from_dir_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(TokenizerError, match="nope"):
        Tokenizer.from_dir(missing)
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot parse .*tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_bad_ids_and_text(tiny):
    with pytest.raises(TokenizerError, match="negative"):
        tiny.decode([1, -1])
    with pytest.raises(TokenizerError, match="str"):
        tiny.encode(None)  # type: ignore[arg-type]
    assert tiny.id_to_token(-1) is None and tiny.id_to_token(10**6) is None


def test_corrupt_side_file_is_named(tmp_path):
    d = write_tiny_tokenizer(tmp_path)
    (d / "generation_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match="generation_config.json"):
        Tokenizer.from_dir(d)


def test_chat_template_errors(tmp_path, tiny):
    no_template = Tokenizer.from_dir(write_tiny_tokenizer(tmp_path / "a", chat_template=None))
    with pytest.raises(TokenizerError, match="no chat template"):
        no_template.apply_chat_template(CONVERSATION)
    bad_messages = [[], "hi", [{"role": "user"}], [{"role": 1, "content": "x"}], ["user: hi"], None]
    for msgs in bad_messages:
        with pytest.raises(TokenizerError, match="message"):
            tiny.apply_chat_template(msgs)  # type: ignore[arg-type]
    refusing = "{% if messages[0].role != 'system' %}{{ raise_exception('first message must be system') }}{% endif %}"
    tok = Tokenizer.from_dir(write_tiny_tokenizer(tmp_path / "b", chat_template=refusing))
    with pytest.raises(TokenizerError, match="first message must be system"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    broken = Tokenizer.from_dir(write_tiny_tokenizer(tmp_path / "c", chat_template="{% for %}"))
    with pytest.raises(TokenizerError, match="not valid Jinja"):
        broken.apply_chat_template(CONVERSATION)
