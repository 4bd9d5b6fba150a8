"""Tiny, fast test artefacts built on the fly: a byte-level BPE tokenizer and a small random checkpoint."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

def _corpus(n_lines: int = 400) -> list[str]:
    rng = random.Random(0)
    words = (
        "the a model diffusion language token mask decode serve train quick brown fox jumps over lazy dog "
        "hello world assistant user system café naïve déjà 你好 世界 中文 测试 🙂 👍 émoji über straße"
    ).split()
    lines = []
    for _ in range(n_lines):
        parts = [rng.choice(words) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.3:
            parts.append(str(rng.randint(0, 99999)))
        lines.append(" ".join(parts) + rng.choice([".", "!", "?", ",", ""]))
    return lines


def write_tiny_tokenizer(path: Path, chat_template: str | None = CHATML, specials=tuple(SPECIALS), **config) -> Path:
    """Train a byte-level BPE on generated text and save it as an HF checkpoint directory."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=list(specials), initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    cfg = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None, **config}
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    gen = {"eos_token_id": [tok.token_to_id("<|endoftext|>")]}
    (path / "generation_config.json").write_text(json.dumps(gen))
    return path


def write_tiny_checkpoint(path: Path, family: str = "qwen3", mask: bool = True, seed: int = 0,
                          tokenizer_config: dict | None = None, **overrides) -> Path:
    """A random tiny model + tiny tokenizer saved as an HF checkpoint (loadable by idlm and transformers).
    tokenizer_config: extra tokenizer_config.json entries (e.g. a BOS token the tokenizer adds)."""
    from idlm.models.config import ModelConfig
    from idlm.models.loader import save_pretrained
    from idlm.models.transformer import Transformer
    from idlm.tokenizer import Tokenizer

    specials = SPECIALS if mask else [t for t in SPECIALS if t != "<|MASK|>"]
    tok_dir = write_tiny_tokenizer(Path(str(path) + "-tokenizer"), specials=specials, **(tokenizer_config or {}))
    tok = Tokenizer.from_dir(tok_dir)
    cfg = dict(family=family, vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
               max_position_embeddings=128, qk_norm=family == "qwen3", qkv_bias=family == "qwen2",
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               mask_token_id=tok.mask_token_id if mask else None)
    cfg.update(overrides)
    model = Transformer(ModelConfig(**cfg)).init_weights(std=0.5, seed=seed)
    save_pretrained(model, path, tokenizer=tok)
    return path


def tiny_transformer(vocab_size: int, std: float = 0.5, seed: int = 0, **overrides):
    """A random 2-layer Qwen3-shaped Transformer (GQA 4/2 heads of 8) for fast numerics tests."""
    from idlm.models.config import ModelConfig
    from idlm.models.transformer import Transformer

    cfg = dict(family="qwen3", vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, qk_norm=True, max_position_embeddings=128)
    cfg.update(overrides)
    return Transformer(ModelConfig(**cfg)).init_weights(std=std, seed=seed).eval()


PROMPT_TEXTS = ["def fibonacci(n):", "What is 17 + 25?", "Copy this text exactly:\nabc def", "class Stack:\n",
                "Reverse the order of the words in this text:\none two three", "import os\n", "The quick brown fox"]


def mixed_prompt(tok, i: int, rng) -> list[int]:
    """Prompt i of a mixed workload for the embedded models: chat (odd i) or raw text, cut at random."""
    t = PROMPT_TEXTS[i % len(PROMPT_TEXTS)]
    ids = tok.encode_chat([{"role": "user", "content": t}]) if i % 2 else tok.encode(t)
    return ids[: rng.randint(max(1, len(ids) // 2), len(ids))]


def write_tiny_shape(path: Path) -> Path:
    """A tiny Qwen3 HF config.json (random weights of it: `--shape PATH` of the bench commands)."""
    import json

    path.write_text(json.dumps(dict(model_type="qwen3", vocab_size=128, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    max_position_embeddings=256)))
    return path


def crash_in_step(monkeypatch, trainer, n: int) -> None:
    """Make the trainer's n-th optimizer step raise KeyboardInterrupt (a run killed mid-way)."""
    real, calls = trainer.optimizer.step, {"n": 0}

    def step(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(trainer.optimizer, "step", step)


def run_script(name: str, *args: str, **env: str) -> dict:
    """Run scripts/<name> in a fresh interpreter with these environment additions (e.g. SMOKE="1",
    OUT=...), require a clean exit (its stderr's tail shown otherwise), and return its last stdout line,
    the JSON summary every benchmark script prints last (checked to say so)."""
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / name
    proc = subprocess.run([sys.executable, str(script), *args], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["summary"] is True
    return last
