"""Load and save checkpoints without trust_remote_code.

Accepted inputs (`load_pretrained`, `load_model`):
- an HF directory: `config.json` + `model.safetensors`, or sharded with `model.safetensors.index.json`
  (Qwen3, Qwen2, Llama, and I-DLM/SDAR configs: `idlm.models.config`);
- a `.gguf` file, or a directory holding exactly one (dequantized to float32: `idlm.models.gguf`);
- a registry name such as `smollm2-135m-instruct` (`idlm.models.registry`).

Loading is strict: a missing tensor, an unexpected tensor or a wrong shape is a `CheckpointError`
naming the tensor (and both shapes). `save_pretrained` writes safetensors + config.json + tokenizer
files that HF transformers loads back, atomically: the target directory is replaced only once the
new one is complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from idlm.atomic import atomic_dir
from idlm.errors import CheckpointError
from idlm.models.config import ModelConfig
from idlm.models.transformer import Transformer

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
# Tensors some checkpoints carry that hold nothing our model needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


# ---------------------------------------------------------------------------------------- locating
def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A registry name or a path -> the checkpoint path (a directory or a .gguf file)."""
    from idlm.models import registry

    if isinstance(name_or_path, str) and registry.is_known(name_or_path) and not os.path.exists(name_or_path):
        return registry.fetch(name_or_path)
    path = Path(name_or_path)
    if not path.exists():
        raise CheckpointError(
            f"model not found: {name_or_path!s} is neither an existing path nor a known model name "
            f"({', '.join(registry.names())})"
        )
    return path


def _gguf_file(path: Path) -> Path | None:
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path} is a file but not a .gguf; pass a checkpoint directory or a .gguf file")
        return path
    if (path / "config.json").exists():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise CheckpointError(f"{path} holds several .gguf files ({', '.join(f.name for f in found)}); pass one")
    if not found:
        raise CheckpointError(f"{path} has no config.json (and no .gguf file): not a model checkpoint")
    return found[0]


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


# ------------------------------------------------------------------------------- config + tensors
def load_config(name_or_path) -> ModelConfig:
    path = resolve_model_path(name_or_path)
    gguf_path = _gguf_file(path)
    if gguf_path is not None:
        from idlm.models.gguf import gguf_config, gguf_metadata, open_gguf

        reader = open_gguf(gguf_path)
        return ModelConfig.from_hf(gguf_config(gguf_metadata(reader), {t.name for t in reader.tensors}))
    return ModelConfig.from_hf(_read_json(path / "config.json"))


def _safetensors_files(path: Path) -> list[Path]:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map' object")
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"missing shard {f.name} listed in {index}")
        return files
    raise CheckpointError(f"{path} has no model.safetensors or model.safetensors.index.json")


def _iter_safetensors(files: list[Path]):
    from safetensors import SafetensorError, safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"cannot read {f}: {e}") from None
        except OSError as e:
            raise CheckpointError(f"cannot read {f}: {e}") from None


def load_state_into(model: Transformer, tensors, source: str) -> None:
    """Copy (name, tensor) pairs into the model, strictly: every parameter exactly once, right shape."""
    params = dict(model.named_parameters())
    tied = model.config.tie_word_embeddings
    seen: set[str] = set()
    with torch.no_grad():
        for name, t in tensors:
            if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                continue
            if name not in params:
                raise CheckpointError(
                    f"{source}: unexpected tensor {name!r} (shape {tuple(t.shape)}): the "
                    f"{model.config.family} model described by its config has no such parameter"
                )
            p = params[name]
            if tuple(t.shape) != tuple(p.shape):
                raise CheckpointError(
                    f"{source}: tensor {name!r} has shape {tuple(t.shape)} but the model expects {tuple(p.shape)}"
                )
            p.copy_(t)
            seen.add(name)
    missing = [n for n in params if n not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: missing tensor {missing[0]!r}{more}")


def load_pretrained(name_or_path, dtype: str | torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    with_tokenizer: bool = True):
    """(model, tokenizer) of a checkpoint; the tokenizer is None when with_tokenizer is False.

    A GGUF file is parsed once for both, and only on its first load: `idlm.models.gguf.load_gguf` caches
    the converted weights and metadata (keyed by the file's sha256).
    """
    from idlm.tokenizer import Tokenizer

    path = resolve_model_path(name_or_path)
    dtype = parse_dtype(dtype)
    gguf_path = _gguf_file(path)
    tokenizer = None
    if gguf_path is not None:
        from idlm.models.gguf import load_gguf

        meta, hf, state = load_gguf(gguf_path)  # parsed and converted once, then read from the cache
        cfg, tensors, source = ModelConfig.from_hf(hf), state.items(), str(gguf_path)
        if with_tokenizer:
            tokenizer = Tokenizer.from_gguf_metadata(meta)
    else:
        cfg = ModelConfig.from_hf(_read_json(path / "config.json"))
        tensors, source = _iter_safetensors(_safetensors_files(path)), str(path)
        if with_tokenizer:
            tokenizer = Tokenizer.from_dir(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(dtype).to_empty(device=device)
    load_state_into(model, tensors, source)
    return model.eval(), tokenizer


def load_tokenizer(name_or_path):
    """The tokenizer of a checkpoint (a directory's tokenizer files, or a GGUF's metadata), no weights."""
    from idlm.tokenizer import Tokenizer

    path = resolve_model_path(name_or_path)
    gguf_path = _gguf_file(path)
    if gguf_path is not None:
        from idlm.models.gguf import load_gguf

        return Tokenizer.from_gguf_metadata(load_gguf(gguf_path)[0])
    return Tokenizer.from_dir(path)


def load_model(name_or_path, dtype: str | torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> Transformer:
    """Build the model a checkpoint describes and load its weights (strictly)."""
    return load_pretrained(name_or_path, dtype, device, with_tokenizer=False)[0]


def load_weights(model: Transformer, checkpoint_dir: str | os.PathLike) -> None:
    """Load a safetensors checkpoint directory's weights into an existing model (strictly)."""
    path = Path(checkpoint_dir)
    load_state_into(model, _iter_safetensors(_safetensors_files(path)), str(path))


# -------------------------------------------------------------------------------------- saving
def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


def _own(t: torch.Tensor) -> torch.Tensor:
    """t itself, or a copy where t is a slice of a larger storage."""
    return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t


def save_pretrained(model: Transformer, path: str | os.PathLike, tokenizer=None,
                    max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write config.json + safetensors (sharded above max_shard_bytes) + tokenizer files, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_dir(path) as tmp:
        # (a fused model's q/k/v and gate/up parameters are row slices of one tensor; safetensors before 0.8
        # refuses tensors that share memory, so views are copied — the pin allows >= 0.4)
        state = {n: _own(p.detach().contiguous().cpu()) for n, p in model.named_parameters()}
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in state.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({n: fname for n in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            with open(tmp / "model.safetensors.index.json", "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        hf = model.config.to_hf()
        hf["torch_dtype"] = _dtype_name(model.dtype)
        with open(tmp / "config.json", "w") as f:
            json.dump(hf, f, indent=2)
        gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
        with open(tmp / "generation_config.json", "w") as f:
            json.dump(gen, f, indent=2)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return path
