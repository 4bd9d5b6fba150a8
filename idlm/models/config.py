"""The model configuration: one dataclass for the Qwen3, Qwen2 and Llama families (and I-DLM/SDAR).

HF `config.json` files differ per family in names and defaults; `ModelConfig.from_hf` maps them
onto one validated description that `idlm.models.transformer.Transformer` builds from, and
`to_hf` writes a config that HF transformers loads back (so our checkpoints open in transformers).

I-DLM checkpoints (model_type "sdar", SPEC §8) are Qwen3-shaped: they map onto the qwen3 family and
keep `mask_token_id` and `block_size`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from idlm.errors import ConfigError

FAMILIES = ("qwen3", "qwen2", "llama")
# model_type in config.json -> family. "sdar" is the I-DLM/SDAR architecture: Qwen3 with a MASK token.
_MODEL_TYPES = {"qwen3": "qwen3", "qwen2": "qwen2", "llama": "llama", "mistral": "llama", "sdar": "qwen3"}
_ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    family: str  # "qwen3" | "qwen2" | "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q/k/v projections (always on for Qwen2)
    o_bias: bool = False  # bias on the output projection
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    mask_token_id: int | None = None  # the MASK token of an I-DLM (SPEC §2); None for plain AR models
    block_size: int | None = None  # I-DLM/SDAR training block size, kept for round trips

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown model family {self.family!r}; supported: {', '.join(FAMILIES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.rope_scaling is not None:
            rtype = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rtype not in _ROPE_TYPES:
                raise ConfigError(f"unsupported rope_scaling type {rtype!r}; supported: {', '.join(_ROPE_TYPES)}")
            if rtype == "default":
                self.rope_scaling = None
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            raise ConfigError(f"mask_token_id {self.mask_token_id} is outside the vocabulary (size {self.vocab_size})")

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    @property
    def num_parameters(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0) + (h if self.o_bias else 0)
        attn += 2 * d if self.qk_norm else 0
        mlp = 3 * h * i + ((2 * i + h) if self.mlp_bias else 0)
        layer = attn + mlp + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + emb + h

    # ------------------------------------------------------------------ HF config.json mapping
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from an HF config.json dict; unknown extra keys are ignored as transformers does."""
        if not isinstance(hf, dict):
            raise ConfigError("config.json must hold a JSON object")
        model_type = hf.get("model_type")
        if model_type not in _MODEL_TYPES:
            arch = hf.get("architectures")
            raise ConfigError(
                f"unknown architecture: model_type {model_type!r} (architectures {arch!r}); "
                f"supported model_type values: {', '.join(sorted(_MODEL_TYPES))}"
            )
        family = _MODEL_TYPES[model_type]
        if hf.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ConfigError(f"unsupported hidden_act {hf['hidden_act']!r}; only silu (SwiGLU) is supported")
        if hf.get("use_sliding_window") and hf.get("sliding_window"):
            raise ConfigError("sliding-window attention (use_sliding_window: true) is not supported")

        def req(key):
            if key not in hf or hf[key] is None:
                raise ConfigError(f"config.json lacks the required field {key!r}")
            return hf[key]

        n_heads = req("num_attention_heads")
        hidden = req("hidden_size")
        rope_params = hf.get("rope_parameters") or {}
        rope_theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_scaling = hf.get("rope_scaling")
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            family=family,
            vocab_size=req("vocab_size"),
            hidden_size=hidden,
            intermediate_size=req("intermediate_size"),
            num_hidden_layers=req("num_hidden_layers"),
            num_attention_heads=n_heads,
            num_key_value_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hidden // n_heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=dict(rope_scaling) if rope_scaling else None,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=True if family == "qwen2" else attention_bias,
            o_bias=False if family == "qwen2" else attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=family == "qwen3",
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            mask_token_id=hf.get("mask_token_id"),
            block_size=hf.get("block_size"),
        )

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that HF transformers loads as the matching *ForCausalLM class."""
        if self.family == "qwen2" and (not self.qkv_bias or self.o_bias):
            raise ConfigError("a qwen2 config must have q/k/v biases and no output bias")
        if self.family != "qwen2" and self.qkv_bias != self.o_bias:
            raise ConfigError(f"a {self.family} config has one attention_bias for q/k/v/o; got different values")
        if self.qk_norm != (self.family == "qwen3"):
            raise ConfigError("qk_norm is on exactly for the qwen3 family")
        hf: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.family]],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.qkv_bias,
            "mlp_bias": self.mlp_bias,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }
        if self.family == "qwen2":
            hf.pop("attention_bias")
            hf["use_sliding_window"] = False
        if self.mask_token_id is not None:
            hf["mask_token_id"] = self.mask_token_id
        if self.block_size is not None:
            hf["block_size"] = self.block_size
        return hf

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
