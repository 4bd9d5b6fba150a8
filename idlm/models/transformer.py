"""One decoder-only transformer for the Qwen3, Qwen2 and Llama families.

RMSNorm, RoPE with per-token positions, grouped-query attention (optional q/k/v/o biases, Qwen3's
per-head q/k RMSNorm), SwiGLU MLP, tied or untied embeddings. Parameter names equal HF transformers'
(`model.layers.N.self_attn.q_proj.weight`, ...), so checkpoints load without a name map.

R-ISD's gated LoRA (SPEC §5, `idlm.layers.lora`) runs either as separate low-rank matmuls
(`_project`, training and the reference path) or, for inference, folded into the projections
(`fuse_lora`, D = scale·B·A), in one of two layouts for q/k/v and gate/up: "pair" — the doubled input
[x, g·x] times [W | D] (a gated row gets (W + D)x, an ungated one exactly Wx + D·0 = Wx), built by the norm
before them; "select" — x times [W ; W + D], both halves [Wx, (W + D)x] computed for every row and each row's
taken by the compiled kernel after the matmul (RoPE, SiLU·up), so the matmul keeps AR's depth K and doubles
its width instead (more thread blocks, not a longer loop each: at a few rows a matmul's time follows K). o and
down output the halves [Wx, Dx] times [W ; D] in both, and the norm after them adds Wx + g·Dx to the
residual stream (exactly Wx where g = 0). So an R-ISD step runs the same matmuls as plain AR and no extra
kernel. Both read twice AR's weight bytes (W and a dense D); the third layout, "lowrank", keeps the adapter
low-rank: each projection is one kernel computing Wx + g·B'(Ax) per row (`idlm.layers.lora_kernel`, a decode
step's few rows on CUDA; matmuls elsewhere), so the norms, RoPE and SiLU are AR's and W is read once.

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
from idlm.layers.lora import select_half
from idlm.layers.lora_kernel import LORA_KERNEL_MAX_ROWS, lora_mm, lora_workspace, lowrank_factors
from idlm.layers.norm import RMSNorm
from idlm.layers.rotary import RotaryEmbedding, apply_rotary, qk_norm_rotary, rotary_qk, rotary_qkv_fast, split_qkv
from idlm.models.config import ModelConfig


def _project(linear: nn.Linear, name: str, x: torch.Tensor, lora, mm=F.linear) -> torch.Tensor:
    """linear(x) (through `mm`, F.linear's signature), plus the gated LoRA delta when `lora` = (LayerLoRA,
    gate [B, T]) is given (SPEC §5)."""
    y = mm(x, linear.weight, linear.bias)
    if lora is not None:
        delta = lora[0].delta(name, x, lora[1])
        if delta is not None:
            y = y + delta
    return y


def _matmul(exact: bool):
    """F.linear, or in exact mode the batch-invariant matmul (imported on use: it needs Triton)."""
    if not exact:
        return F.linear
    from idlm.layers.invariant import invariant_linear

    return invariant_linear


def _cat_linear(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of one Linear computing all of `linears` side by side (a copy, not a parameter)."""
    bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
    return torch.cat([m.weight for m in linears]), bias


def _share_rows(linears, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Point each Linear's weight (and bias) at its rows of the fused `weight` (`bias`), made by `_cat_linear`
    from these very Linears: the values are unchanged and the separate tensors are freed (no copy kept)."""
    start = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight.data = weight[start: start + n]
        if bias is not None:
            lin.bias.data = bias[start: start + n]
        start += n


LORA_LAYOUTS = ("pair", "select", "lowrank")  # `Transformer.fuse_lora`'s layouts (module docstring)
DUAL_LAYOUTS = ("pair", "select")  # the layouts whose o and down output [Wx, Dx] halves for the next norm


def _lora_linear(layer_lora, named: list[tuple[str, nn.Linear]], layout: str = "pair"
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of `fuse_lora` for the projections `named` side by side, D = scale·B·A of each targeted
    projection (computed in float32) and 0 for the others: layout "pair" [W | D] [out, 2·in]; "select"
    [W ; W + D] [2·out, in] (W + D summed in float32, rounded once) with the bias in both halves."""
    weight, bias = _cat_linear(*(m for _, m in named))
    acc = torch.promote_types(weight.dtype, torch.float32)
    delta = torch.cat([_lora_delta(layer_lora, name, m, acc) for name, m in named])
    if layout == "select":
        return (torch.cat([weight, (weight.to(acc) + delta).to(weight.dtype)]),
                None if bias is None else torch.cat([bias, bias]))
    return torch.cat([weight, delta.to(weight.dtype)], dim=1), bias


def _lora_delta(layer_lora, name: str, m: nn.Linear, acc: torch.dtype) -> torch.Tensor:
    """D = scale·B·A of projection `name` in dtype `acc` (at least float32), zeros where it has no LoRA."""
    pair = layer_lora.pairs[name] if name in layer_lora.pairs else None
    if pair is None:
        return torch.zeros_like(m.weight, dtype=acc)
    return layer_lora.scale * (pair.lora_B.weight.to(acc) @ pair.lora_A.weight.to(acc))


def _lora_linear_out(layer_lora, name: str, m: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [2·out, in], bias) of `fuse_lora` for a projection whose consumer applies the gate:
    [W ; D] (D = scale·B·A, or 0) gives the halves [Wx, Dx]; the bias goes to the first half only."""
    d = _lora_delta(layer_lora, name, m, torch.promote_types(m.weight.dtype, torch.float32)).to(m.weight.dtype)
    bias = None if m.bias is None else torch.cat([m.bias, torch.zeros_like(m.bias)])
    return torch.cat([m.weight, d]), bias


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # set by Transformer.fuse_projections
        self.qkv_lora = self.o_lora = None  # set by Transformer.fuse_lora: (weight [out, 2 in], bias)
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

    def forward(self, x, cos, sin, attn: AttentionBackend, lora=None, exact=False):
        """x [B, T, H] (with a fused LoRA, lora=(layer LoRA, gate, layout): x is already [x, g·x] [B, T, 2H] in
        the "pair" layout); exact: batch-invariant matmuls and norms (issue 16)."""
        mm = _matmul(exact)
        B, T, _ = x.shape
        fused_lora = lora[2] if lora is not None else None  # None / False: no fused LoRA; else its layout
        split = [self.n_heads * self.head_dim] + [self.n_kv * self.head_dim] * 2
        if not exact and (fused_lora or (self.qkv is not None and lora is None)):
            # one fused q/k/v matmul ("select" layout: halves [Wx, (W + D)x], each row's picked), then norms,
            # RoPE and v in one compiled function with one output (`rotary_qkv`): one kernel on CUDA, with Qwen3's
            # q/k norms too (the H200, session 27); on CUDA a Triton program per token instead ($IDLM_ROTARY_KERNEL)
            qn, kn = (None, None) if self.q_norm is None else (self.q_norm.weight, self.k_norm.weight)
            if fused_lora == "lowrank":  # W and the low-rank factors in one kernel, each row gated there
                qkv = lora_mm(x, self.qkv_lora, lora[1], mm)
            else:
                qkv = mm(x, *(self.qkv_lora if fused_lora else self.qkv))
            qkv = rotary_qkv_fast(qkv, lora[1] if fused_lora == "select" else None, cos, sin, self.n_heads,
                                  self.n_kv, qn, kn, 0.0 if self.q_norm is None else self.q_norm.eps)
            return self._attend_out(*split_qkv(qkv, self.n_heads, self.n_kv), attn, lora, mm)
        if fused_lora == "select":  # exact mode: the half picked here, the norms and RoPE below
            q, k, v = select_half(mm(x, *self.qkv_lora), lora[1]).split(split, -1)
        elif fused_lora == "lowrank":
            q, k, v = lora_mm(x, self.qkv_lora, lora[1], mm).split(split, -1)
        elif fused_lora:
            q, k, v = mm(x, *self.qkv_lora).split(split, -1)
        elif self.qkv is not None and lora is None:
            q, k, v = mm(x, *self.qkv).split(split, -1)
        else:
            q, k, v = (_project(m, name, x, lora, mm) for m, name in
                       ((self.q_proj, "q_proj"), (self.k_proj, "k_proj"), (self.v_proj, "v_proj")))
        q = q.view(B, T, self.n_heads, self.head_dim)
        k, v = k.view(B, T, self.n_kv, self.head_dim), v.view(B, T, self.n_kv, self.head_dim)
        if exact:  # batch-invariant norms (issue 16), then RoPE
            if self.q_norm is not None:
                q, k = self.q_norm(q, exact=True), self.k_norm(k, exact=True)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        elif self.q_norm is not None:  # one compiled function for norms and RoPE (same math as above)
            q, k = qk_norm_rotary(q, k, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, cos, sin)
        else:
            q, k = rotary_qk(q, k, cos, sin)
        return self._attend_out(q, k, v, attn, lora, mm)

    def _attend_out(self, q, k, v, attn: AttentionBackend, lora, mm):
        """q [B, T, Hq, D], k / v [B, T, Hkv, D] (RoPE applied) -> the o projection of their attention."""
        B, T = q.shape[:2]
        # attention takes [B, H, T, D] views of the [B, T, H, D] tensors: a paged cache writes k/v rows and
        # the Triton kernel returns o without a copy
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        o = attn.attend(self.layer_idx, q, k, v).transpose(1, 2).reshape(B, T, -1)  # [B, T, Hq·D]
        if lora is not None and lora[2] == "lowrank":
            return lora_mm(o, self.o_lora, lora[1], mm)
        if lora is not None and lora[2]:  # [W_o o, D_o o]: the next norm adds W_o o + g·D_o o to the stream
            return mm(o, *self.o_lora)
        return _project(self.o_proj, "o_proj", o, lora, mm)


@cuda_fused
def embed_rows(input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The embedding lookup as a compiled gather on CUDA: ATen's index_select for a handful of indices
    (`indexSelectSmallIndex`) loops over them in every thread, ~8 µs for a 16-row block on the H200."""
    return F.embedding(input_ids, weight)


@cuda_fused
def embed_masked(input_ids: torch.Tensor, weight: torch.Tensor, mask_embedding: torch.Tensor,
                 is_mask: torch.Tensor) -> torch.Tensor:
    """`embed_rows`, the rows where is_mask [B, T] taking the adapter's MASK embedding [H] (one kernel on CUDA)."""
    x = F.embedding(input_ids, weight)
    return torch.where(is_mask[..., None], mask_embedding.to(x.dtype), x)


@cuda_fused
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@cuda_fused
def silu_mul_chunks(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up of a fused [gate, up] matmul output, one kernel."""
    gate, up = gate_up.chunk(2, -1)
    return F.silu(gate) * up


@cuda_fused
def silu_mul_gated(gate_up2: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up of a "select"-layout [gate, up] matmul output (each row's half picked first), one kernel."""
    return silu_mul_chunks.__wrapped__(select_half(gate_up2, gate))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=cfg.mlp_bias)
        self.gate_up: tuple[torch.Tensor, torch.Tensor | None] | None = None  # Transformer.fuse_projections
        self.gate_up_lora = self.down_lora = None  # Transformer.fuse_lora

    def forward(self, x, lora=None, exact=False):
        mm = _matmul(exact)
        if lora is not None and lora[2] == "lowrank":  # each projection one kernel, gated per row inside it
            a = silu_mul_chunks(lora_mm(x, self.gate_up_lora, lora[1], mm))
            return lora_mm(a, self.down_lora, lora[1], mm)
        if lora is not None and lora[2]:  # fused LoRA; returns [W_d a, D_d a] (the next norm gates)
            gate_up = mm(x, *self.gate_up_lora)  # "pair": of [x, g·x]; "select": of x, halves [Wx, (W + D)x]
            # (elementwise: each row's values are its own in exact mode too)
            a = silu_mul_gated(gate_up, lora[1]) if lora[2] == "select" else silu_mul_chunks(gate_up)
            return mm(a, *self.down_lora)
        if self.gate_up is not None and lora is None:
            gate, up = mm(x, *self.gate_up).chunk(2, -1)
        else:
            gate = _project(self.gate_proj, "gate_proj", x, lora, mm)
            up = _project(self.up_proj, "up_proj", x, lora, mm)
        return _project(self.down_proj, "down_proj", silu_mul(gate, up), lora, mm)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, residual, cos, sin, attn, lora=None, exact=False):
        """Pre-norm block in the residual-stream form: h is the previous block's output (the embeddings when
        residual is None) and the stream is residual + h; returns (this block's output, the stream
        before it). Each residual add runs fused with the norm that follows it."""
        if lora is None or lora[2] not in DUAL_LAYOUTS:  # no fused LoRA, or "lowrank" (AR's norms)
            if residual is None:
                residual, x = h, self.input_layernorm(h, exact=exact)
            else:
                residual, x = self.input_layernorm(h, residual, exact=exact)
            h = self.self_attn(x, cos, sin, attn, lora, exact)
            residual, x = self.post_attention_layernorm(h, residual, exact=exact)
            return self.mlp(x, lora, exact), residual
        # fused LoRA (`Transformer.fuse_lora`): blocks output [base, delta] halves ("dual") that the next norm
        # adds to the stream as base + g·delta, and in the "pair" layout norms emit [x, g·x] for the next matmul
        g, pair = lora[1], lora[2] == "pair"
        if residual is None:
            residual, x = h, self.input_layernorm(h, gate=g, pair=pair, exact=exact)
        else:
            residual, x = self.input_layernorm(h, residual, gate=g, pair=pair, dual=True, exact=exact)
        h = self.self_attn(x, cos, sin, attn, lora, exact)
        residual, x = self.post_attention_layernorm(h, residual, gate=g, pair=pair, dual=True, exact=exact)
        return self.mlp(x, lora, exact), residual


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
    def add_vocab_rows(self, n: int = 1) -> int:
        """Grow the vocabulary by n tokens (the embedding, and the LM head when untied), each new row the
        mean of the existing ones; config.vocab_size follows. Returns the first new id. For giving a model
        that has none a MASK token before converting it to an I-DLM (SPEC §3): the new row is trained as
        the MASK input, and the conversion (where it is never a target) teaches the head not to emit it."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        old = self.config.vocab_size

        def grown(weight: torch.Tensor) -> nn.Parameter:
            rows = weight.mean(0, keepdim=True).expand(n, -1)
            return nn.Parameter(torch.cat([weight, rows], 0), requires_grad=weight.requires_grad)

        emb = self.model.embed_tokens
        emb.weight = grown(emb.weight)
        emb.num_embeddings = old + n
        if self.lm_head is not None:
            self.lm_head.weight = grown(self.lm_head.weight)
            self.lm_head.out_features = old + n
        self.config.vocab_size = old + n
        return old

    @torch.no_grad()
    def fuse_projections(self, enable: bool = True):
        """Inference: one [q; k; v] and one [gate; up] matmul per layer instead of five (a small model's decode
        step is bound by kernel launches; an 8B one's k and v matmuls read their weights at half the speed
        of one wide matmul, docs/engine.md). No extra memory: the fused weights are built once and the
        parameters (which keep their names) become row slices of them (`_share_rows`), so each projection's
        weight is stored once. Forwards with a LoRA use the separate projections (the same values).
        Idempotent: an already fused model keeps its fused weights (CUDA graphs captured on them stay
        valid). enable=False gives each parameter its own storage again and drops the fused weights (then
        fuse again after changing weights)."""
        for layer in self.model.layers:
            a, m = layer.self_attn, layer.mlp
            groups = ((a, "qkv", (a.q_proj, a.k_proj, a.v_proj)), (m, "gate_up", (m.gate_proj, m.up_proj)))
            for owner, name, linears in groups:
                if not enable:
                    if getattr(owner, name) is not None:
                        for lin in linears:  # own storage again (the fused tensor goes with the attribute)
                            for p in (lin.weight, lin.bias):
                                if p is not None:
                                    p.data = p.data.clone()
                    setattr(owner, name, None)
                elif getattr(owner, name) is None:
                    fused = _cat_linear(*linears)
                    _share_rows(linears, *fused)
                    setattr(owner, name, fused)
        return self

    @torch.no_grad()
    def fuse_lora(self, adapter=None, layout: str = "select"):
        """Inference with an R-ISD adapter: per layer, [q; k; v], o, [gate; up] and down each become one
        matmul with D = scale·B·A folded in (`_lora_linear`, `_lora_linear_out`; `layout` "pair" or "select",
        the module docstring), so a decode step with the adapter runs as many matmuls as plain AR; or, "lowrank",
        with (W, A, B' = scale·B, bias) kept apart for `lora_mm`'s one kernel each. Forwards
        with this very adapter use them; any other adapter (or None) takes the separate projections.
        Idempotent for the same adapter and layout; adapter=None drops the copies. The copies are 2x the
        projection weights (`fusable_bytes(lora=True)`; "lowrank": the q/k/v and gate/up concatenations, shared
        with `fuse_projections`' where it ran, and the factors)."""
        if layout not in LORA_LAYOUTS:
            raise ValueError(f"fuse_lora: layout must be one of {LORA_LAYOUTS}, got {layout!r}")
        if adapter is None:
            for layer in self.model.layers:
                layer.self_attn.qkv_lora = layer.self_attn.o_lora = None
                layer.mlp.gate_up_lora = layer.mlp.down_lora = None
            self._fused_lora = self._fused_lora_layout = None
            return self
        if getattr(self, "_fused_lora", None) is adapter and self._fused_lora_layout == layout:
            return self
        adapter.check_fits(self.config)
        for layer, la in zip(self.model.layers, adapter.layers):
            a, m = layer.self_attn, layer.mlp
            if layout == "lowrank":  # (W, A, B', bias, segments, workspace) each; W shared with `fuse_projections`'s
                qkv, gate_up = [(w, b) if w is not None else _cat_linear(*ms) for (w, b), ms in (
                    (a.qkv or (None, None), (a.q_proj, a.k_proj, a.v_proj)),
                    (m.gate_up or (None, None), (m.gate_proj, m.up_proj)))]

                def factors(named, fused=(None, None)):
                    w, lo_a, lo_b, segments = lowrank_factors(la, named, fused[0])
                    space = None if lo_a is None or w.device.type != "cuda" else lora_workspace(
                        LORA_KERNEL_MAX_ROWS, lo_a.shape[0], w.dtype, w.device)  # (`lora_mm`'s shared x·Aᵀ)
                    return w, lo_a, lo_b, fused[1] if fused[0] is not None else named[0][1].bias, segments, space

                a.qkv_lora = factors([("q_proj", a.q_proj), ("k_proj", a.k_proj), ("v_proj", a.v_proj)], qkv)
                a.o_lora = factors([("o_proj", a.o_proj)])
                m.gate_up_lora = factors([("gate_proj", m.gate_proj), ("up_proj", m.up_proj)], gate_up)
                m.down_lora = factors([("down_proj", m.down_proj)])
                continue
            a.qkv_lora = _lora_linear(la, [("q_proj", a.q_proj), ("k_proj", a.k_proj), ("v_proj", a.v_proj)],
                                      layout)
            a.o_lora = _lora_linear_out(la, "o_proj", a.o_proj)
            m.gate_up_lora = _lora_linear(la, [("gate_proj", m.gate_proj), ("up_proj", m.up_proj)], layout)
            m.down_lora = _lora_linear_out(la, "down_proj", m.down_proj)
        self._fused_lora, self._fused_lora_layout = adapter, layout
        return self

    def lora_step_bytes(self, adapter) -> dict[str, int]:
        """Weight bytes an R-ISD decode step reads with `adapter` folded in ("select": [W ; W + D] of every
        projection; "lowrank": W and the adapter's factors, in this model's dtype), the LM head included — what
        `choose_lora_layout` weighs against the L2."""
        head = (self.lm_head or self.model.embed_tokens).weight  # tied: the embedding is the head
        head_bytes = head.numel() * head.element_size()
        proj = self.fusable_bytes(lora=True) // 2  # the seven projections' W
        factors = sum(p.numel() for n, p in adapter.named_parameters() if "lora_" in n) * head.element_size()
        return {"select": 2 * proj + head_bytes, "lowrank": proj + factors + head_bytes}

    def fusable_bytes(self, lora: bool = False) -> int:
        """Bytes that `fuse_projections` builds (the q, k, v, gate and up weights; while fusing, one layer's
        separate and fused copies live at once, then the separate ones are freed), or that `fuse_lora`
        adds (lora=True)."""
        names = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
        if lora:  # fuse_lora: [W | D] of every projection, twice the weights
            names += ("o_proj", "down_proj")
        size = sum(p.numel() * p.element_size() for n, p in self.named_parameters()
                   if n.split(".")[-2] in names and n.endswith("weight"))
        return 2 * size if lora else size

    def embed(self, input_ids: torch.Tensor, mask_embedding: torch.Tensor | None = None,
              is_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> [B, T, H]; with an adapter's `mask_embedding` [H], the rows where `is_mask` [B, T]
        take it instead (R-ISD's MASK slots)."""
        w = self.model.embed_tokens.weight
        if mask_embedding is None or is_mask is None:
            return embed_rows(input_ids, w)
        return embed_masked(input_ids, w, mask_embedding, is_mask)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                attn: AttentionBackend | None = None, lora=None, lora_gate: torch.Tensor | None = None,
                is_mask: torch.Tensor | None = None, exact: bool = False) -> torch.Tensor:
        """input_ids [B, T], positions [B, T] -> final hidden [B, T, H].

        positions default to 0..T-1; attn defaults to plain causal attention without a cache.
        With a `lora` adapter (idlm.layers.lora.LoRAAdapter), tokens where `is_mask` [B, T] is true take
        the adapter's MASK embedding and every projection adds the LoRA delta where `lora_gate` [B, T] is 1.
        exact (issue 16): every projection and norm through the batch-invariant kernels
        (`idlm.layers.invariant`), so a token row's values do not depend on the other rows; attention's
        part is the backend's (the paged kernel's exact variant, `PagedAttention(exact=True)`).
        """
        x = self.embed(input_ids, None if lora is None else lora.mask_embedding, is_mask)
        B, T = x.shape[:2]
        if positions is None:
            positions = torch.arange(T, device=x.device).expand(B, T)
        attn = attn if attn is not None else DenseAttention()
        if lora is not None:
            if lora_gate is None:
                lora_gate = torch.zeros(B, T, device=x.device)
        cos, sin = self.model.rotary_emb(positions, x.dtype)
        residual = None
        fused = lora is not None and getattr(self, "_fused_lora", None) is lora
        layout = self._fused_lora_layout if fused else False  # lora[2] of the layers: False or the layout
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, cos, sin, attn,
                                None if lora is None else (lora.layers[i], lora_gate, layout), exact)
        if fused and layout in DUAL_LAYOUTS:  # the last block's output is [base, delta] halves
            return self.model.norm(x, residual, gate=lora_gate, dual=True, exact=exact)[1]
        return self.model.norm(x, residual, exact=exact)[1]

    def compute_logits(self, hidden: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """hidden [..., H] -> float32 logits [..., V] (exact: through the batch-invariant matmul)."""
        w = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return _matmul(exact)(hidden, w).float()

    def logits(self, input_ids, positions=None, attn=None) -> torch.Tensor:
        """Convenience: logits [B, T, V] at every position."""
        return self.compute_logits(self.forward(input_ids, positions, attn))
