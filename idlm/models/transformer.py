"""One decoder-only transformer for the Qwen3, Qwen2 and Llama families.

RMSNorm, RoPE with per-token positions, grouped-query attention (optional q/k/v/o biases, Qwen3's
per-head q/k RMSNorm), SwiGLU MLP, tied or untied embeddings. Parameter names equal HF transformers'
(`model.layers.N.self_attn.q_proj.weight`, ...), so checkpoints load without a name map.

The model is agnostic of where KV lives: `forward` takes an attention backend
(`idlm.layers.attention`) that owns the cache. It returns hidden states; `compute_logits` turns the
rows you need into logits, so callers pay the vocabulary projection only where logits are used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from idlm.layers.attention import AttentionBackend, DenseAttention
from idlm.layers.fused import cuda_fused
from idlm.layers.norm import RMSNorm
from idlm.layers.rotary import RotaryEmbedding, apply_rotary
from idlm.models.config import ModelConfig


def _project(linear: nn.Linear, name: str, x: torch.Tensor, lora) -> torch.Tensor:
    """linear(x), plus the gated LoRA delta when `lora` = (LayerLoRA, gate [B, T]) is given (SPEC §5)."""
    y = linear(x)
    if lora is not None:
        delta = lora[0].delta(name, x, lora[1])
        if delta is not None:
            y = y + delta
    return y


def _cat_linear(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of one Linear computing all of `linears` side by side (a copy, not a parameter)."""
    bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
    return torch.cat([m.weight for m in linears]), bias


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # set by Transformer.fuse_projections
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, q, kv = cfg.hidden_size, self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.q_proj = nn.Linear(h, q, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, kv, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, kv, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q, h, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, attn: AttentionBackend, lora=None):  # x [B, T, H]
        B, T, _ = x.shape
        if self.qkv is not None and lora is None:
            q, k, v = F.linear(x, *self.qkv).split([self.n_heads * self.head_dim] + [self.n_kv * self.head_dim] * 2, -1)
        else:
            q, k, v = (_project(m, name, x, lora) for m, name in
                       ((self.q_proj, "q_proj"), (self.k_proj, "k_proj"), (self.v_proj, "v_proj")))
        q = q.view(B, T, self.n_heads, self.head_dim)
        k, v = k.view(B, T, self.n_kv, self.head_dim), v.view(B, T, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # attention takes [B, H, T, D] views of the [B, T, H, D] tensors: a paged cache writes k/v rows and
        # the Triton kernel returns o without a copy
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        o = attn.attend(self.layer_idx, q, k, v)  # [B, Hq, T, D]
        return _project(self.o_proj, "o_proj", o.transpose(1, 2).reshape(B, T, -1), lora)


@cuda_fused
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=cfg.mlp_bias)
        self.gate_up: tuple[torch.Tensor, torch.Tensor | None] | None = None  # Transformer.fuse_projections

    def forward(self, x, lora=None):
        if self.gate_up is not None and lora is None:
            gate, up = F.linear(x, *self.gate_up).chunk(2, -1)
        else:
            gate, up = _project(self.gate_proj, "gate_proj", x, lora), _project(self.up_proj, "up_proj", x, lora)
        return _project(self.down_proj, "down_proj", silu_mul(gate, up), lora)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, residual, cos, sin, attn, lora=None):
        """Pre-norm block in the residual-stream form: h is the previous block's output (the embeddings when
        residual is None) and the stream is residual + h; returns (this block's output, the stream
        before it). Each residual add runs fused with the norm that follows it."""
        if residual is None:
            residual, x = h, self.input_layernorm(h)
        else:
            residual, x = self.input_layernorm(h, residual)
        h = self.self_attn(x, cos, sin, attn, lora)
        residual, x = self.post_attention_layernorm(h, residual)
        return self.mlp(x, lora), residual


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def init_weights(self, std: float = 0.02, seed: int | None = None):
        """Random init (normal(0, std) matrices, unit norms, zero biases), for tests and training."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    @torch.no_grad()
    def fuse_projections(self, enable: bool = True):
        """Inference: one [q; k; v] and one [gate; up] matmul per layer instead of five (a small model's decode
        step is bound by kernel launches). Keeps copies of those weights beside the parameters (which,
        with their names, stay as they are); forwards with a LoRA use the separate projections.
        Idempotent: an already fused model keeps its copies (CUDA graphs captured on them stay valid).
        enable=False drops the copies (then fuse again after changing weights)."""
        for layer in self.model.layers:
            a, m = layer.self_attn, layer.mlp
            if not enable:
                a.qkv = m.gate_up = None
            elif a.qkv is None:
                a.qkv = _cat_linear(a.q_proj, a.k_proj, a.v_proj)
                m.gate_up = _cat_linear(m.gate_proj, m.up_proj)
        return self

    def fusable_bytes(self) -> int:
        """Bytes that `fuse_projections` copies (the q, k, v, gate and up weights)."""
        names = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
        return sum(p.numel() * p.element_size() for n, p in self.named_parameters() if n.split(".")[-2] in names)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                attn: AttentionBackend | None = None, inputs_embeds: torch.Tensor | None = None,
                lora=None, lora_gate: torch.Tensor | None = None, is_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] (or inputs_embeds [B, T, H]), positions [B, T] -> final hidden [B, T, H].

        positions default to 0..T-1; attn defaults to plain causal attention without a cache.
        With a `lora` adapter (idlm.layers.lora.LoRAAdapter), tokens where `is_mask` [B, T] is true take
        the adapter's MASK embedding and every projection adds the LoRA delta where `lora_gate` [B, T] is 1.
        """
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        if positions is None:
            positions = torch.arange(T, device=x.device).expand(B, T)
        attn = attn if attn is not None else DenseAttention()
        if lora is not None:
            if is_mask is not None:
                x = torch.where(is_mask[..., None], lora.mask_embedding.to(x.dtype), x)
            if lora_gate is None:
                lora_gate = torch.zeros(B, T, device=x.device)
        cos, sin = self.model.rotary_emb(positions, x.dtype)
        residual = None
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, cos, sin, attn, None if lora is None else (lora.layers[i], lora_gate))
        return self.model.norm(x, residual)[1]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> float32 logits [..., V]."""
        w = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, w).float()

    def logits(self, input_ids, positions=None, attn=None) -> torch.Tensor:
        """Convenience: logits [B, T, V] at every position."""
        return self.compute_logits(self.forward(input_ids, positions, attn))
