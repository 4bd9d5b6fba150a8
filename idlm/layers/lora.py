"""Gated LoRA adapters (R-ISD, SPEC §5).

An adapter holds, for every decoder layer and each target projection (q, k, v, o, gate, up, down),
a low-rank pair (A [r, in], B [out, r]) and one trained MASK input embedding. Per linear layer
    y = W x + gate · (alpha / r) · B(A x),
where `gate` is a per-token 0/1 mask. The base model stays untouched: with gate 0 on every clean
token, clean positions compute exactly the base model's outputs (and, attention being causal, never
see MASK states), which is why R-ISD is lossless.

Files: `adapter_config.json` + `adapter_model.safetensors` in PEFT's layout
(`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`), plus `mask_embedding`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from idlm.atomic import atomic_dir
from idlm.errors import CheckpointError, ConfigError

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTN_TARGETS + MLP_TARGETS
_PEFT_PREFIX = "base_model.model.model.layers"
# what an adapter records of its base model (adapter_config.json "idlm_base") and checks on load
BASE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim")


@dataclass
class LoRAConfig:
    rank: int = 128
    alpha: float = 128.0
    targets: tuple[str, ...] = ALL_TARGETS

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ConfigError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        self.targets = tuple(self.targets)
        bad = [t for t in self.targets if t not in ALL_TARGETS]
        if bad or not self.targets:
            raise ConfigError(f"unknown LoRA target {bad[0] if bad else None!r}; choose from {', '.join(ALL_TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _dims(model_config, target: str) -> tuple[int, int]:
    """(in_features, out_features) of a projection."""
    c = model_config
    h, i = c.hidden_size, c.intermediate_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}[target]


class LoRAPair(nn.Module):
    def __init__(self, d_in: int, d_out: int, rank: int):
        super().__init__()
        self.lora_A = nn.Linear(d_in, rank, bias=False)
        self.lora_B = nn.Linear(rank, d_out, bias=False)


class LayerLoRA(nn.Module):
    """The adapters of one decoder layer; `delta(name, x, gate)` is what a projection adds."""

    def __init__(self, model_config, cfg: LoRAConfig):
        super().__init__()
        self.scale = cfg.scale
        self.pairs = nn.ModuleDict({t: LoRAPair(*_dims(model_config, t), cfg.rank) for t in cfg.targets})

    def delta(self, name: str, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor | None:
        """x [B, T, in], gate [B, T] (0/1) -> gate · scale · B(A x) [B, T, out], or None if untargeted."""
        pair = self.pairs[name] if name in self.pairs else None
        if pair is None:
            return None
        return pair.lora_B(pair.lora_A(x)) * (gate[..., None].to(x.dtype) * self.scale)


class LoRAAdapter(nn.Module):
    """A gated LoRA for every layer of a model, and the MASK input embedding."""

    def __init__(self, model_config, cfg: LoRAConfig | None = None):
        super().__init__()
        self.config = cfg or LoRAConfig()
        self.model_config = model_config
        self.layers = nn.ModuleList(LayerLoRA(model_config, self.config) for _ in range(model_config.num_hidden_layers))
        self.mask_embedding = nn.Parameter(torch.zeros(model_config.hidden_size))

    def init_weights(self, std: float = 0.02, seed: int | None = None, zero_b: bool = True):
        """A random A, B = 0 (LoRA's usual start: the adapter begins as a no-op) unless zero_b=False."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("lora_B.weight") and zero_b:
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    def check_fits(self, model_config) -> None:
        """Raise a ConfigError naming the first dimension where this adapter does not fit a model."""
        mine = self.model_config
        for name in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            if getattr(mine, name) != getattr(model_config, name):
                raise ConfigError(f"the LoRA adapter does not fit the model: it was built for {name}="
                                  f"{getattr(mine, name)}, the model has {getattr(model_config, name)}")

    # ------------------------------------------------------------------------------------ files
    def _peft_name(self, name: str) -> str:
        # layers.3.pairs.q_proj.lora_A.weight -> base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
        _, idx, _, target, rest = name.split(".", 4)
        block = "self_attn" if target in ATTN_TARGETS else "mlp"
        return f"{_PEFT_PREFIX}.{idx}.{block}.{target}.{rest}"

    def save(self, path: str | os.PathLike) -> Path:
        """adapter_config.json + adapter_model.safetensors, written atomically (temp dir + rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        with atomic_dir(path) as tmp:
            tensors = {"mask_embedding": self.mask_embedding.detach().cpu().contiguous()}
            for name, p in self.named_parameters():
                if name != "mask_embedding":
                    tensors[self._peft_name(name)] = p.detach().cpu().contiguous()
            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            meta = {"peft_type": "LORA", "r": self.config.rank, "lora_alpha": self.config.alpha,
                    "target_modules": list(self.config.targets), "bias": "none", "task_type": "CAUSAL_LM",
                    "idlm_gated": True, "idlm_base": {k: getattr(self.model_config, k) for k in BASE_FIELDS}}
            (tmp / "adapter_config.json").write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model_config, device="cpu", dtype=torch.float32) -> "LoRAAdapter":
        """Load an adapter for `model_config`; any tensor that does not fit the model is named."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        cfg_file, st_file = path / "adapter_config.json", path / "adapter_model.safetensors"
        for f in (cfg_file, st_file):
            if not f.exists():
                raise CheckpointError(f"LoRA adapter file missing: {f}")
        try:
            meta = json.loads(cfg_file.read_text())
            cfg = LoRAConfig(rank=int(meta["r"]), alpha=float(meta["lora_alpha"]),
                             targets=tuple(meta["target_modules"]))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{cfg_file} is not a valid LoRA config: {e}") from None
        base = meta.get("idlm_base") or {}
        # what the tensors cannot show (their shapes are checked one by one below, naming the tensor):
        # the vocabulary the MASK embedding and the drafts were trained against
        for k in ("vocab_size",):
            if k in base and base[k] != getattr(model_config, k):
                raise CheckpointError(f"LoRA adapter {path} was trained for a base model with {k}={base[k]}, "
                                      f"but this model has {k}={getattr(model_config, k)}: it does not fit")
        try:
            tensors = load_file(str(st_file))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {st_file}: {e}") from None
        adapter = cls(model_config, cfg)
        params = dict(adapter.named_parameters())
        by_file = {"mask_embedding": "mask_embedding"}
        by_file.update({adapter._peft_name(n): n for n in params if n != "mask_embedding"})
        for fname, t in tensors.items():
            if fname not in by_file:
                raise CheckpointError(
                    f"LoRA adapter {path}: tensor {fname!r} does not fit the model "
                    f"({model_config.num_hidden_layers} layers, targets {', '.join(cfg.targets)})")
            p = params[by_file[fname]]
            if tuple(t.shape) != tuple(p.shape):
                raise CheckpointError(
                    f"LoRA adapter {path}: tensor {fname!r} has shape {tuple(t.shape)} but the model "
                    f"needs {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(t)
        missing = set(by_file) - set(tensors)
        if missing:
            raise CheckpointError(f"LoRA adapter {path}: missing tensor {sorted(missing)[0]!r}")
        return adapter.to(device=device, dtype=dtype).eval()


def select_half(y2: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """A fused LoRA's "select" layout (`Transformer.fuse_lora`): the matmul halves [Wx, (W + D)x] [..., 2·n]
    -> each row's: (W + D)x where gate [...] is nonzero, else exactly Wx."""
    base, adapted = y2.chunk(2, -1)
    return torch.where(gate[..., None] != 0, adapted, base)
