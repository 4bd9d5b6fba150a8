"""Random-weight models of any HF config shape, for engine-only measurements (no weights needed).

`random_model("qwen3-8b")` builds Qwen3-8B's shape (SPEC §8: 36 layers, hidden 4096, 32/8 heads of
128, intermediate 12288, vocab 151936, untied) directly on the target device with normal(0, std)
weights, so an 8B model is ready in seconds on a GPU. Any HF `config.json` (path or dict) or a model
directory works too. The outputs are meaningless; speed and memory traffic are the real model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from idlm.errors import ConfigError
from idlm.models.config import ModelConfig
from idlm.models.loader import parse_dtype
from idlm.models.transformer import Transformer

SHAPES = {
    "qwen3-8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                     tie_word_embeddings=False, mask_token_id=151669),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True),
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, mask_token_id=151669),
}


def shape_config(shape: str | dict | Path) -> ModelConfig:
    """A named shape, an HF config dict, a config.json path or a checkpoint directory -> ModelConfig."""
    if isinstance(shape, dict):
        return ModelConfig.from_hf(shape)
    if isinstance(shape, str) and shape in SHAPES:
        return ModelConfig.from_hf(SHAPES[shape])
    path = Path(shape)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"unknown model shape {str(shape)!r}: name one of {', '.join(SHAPES)} "
                          "or give an HF config.json (or a directory holding one)")
    return ModelConfig.from_hf(json.loads(path.read_text()))


@torch.no_grad()
def random_model(shape, dtype="bfloat16", device="cpu", seed: int = 0, std: float = 0.02) -> Transformer:
    cfg = shape_config(shape)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(parse_dtype(dtype)).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.normal_(0.0, std, generator=g)
    return model.eval()
