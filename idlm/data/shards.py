"""The on-disk training format: flat token streams with a loss mask, memory-mapped for reading.

Why this format (nanoGPT/nanochat style): a training step needs random fixed-length windows of
tokens, nothing else. One flat uint16 array per split, read through `np.memmap`, costs no parsing,
no RAM beyond the pages touched and no start-up time, and a window is a slice. The loss mask rides
alongside as a uint8 array of the same length so chat data keeps its prompt/response structure
(SPEC §3.1: no loss on prompt tokens).

A dataset directory holds, per split:
    {split}.tokens.bin     uint16[n]   token ids, samples concatenated
    {split}.lossmask.bin   uint8[n]    1 = a response token (a training target), 0 = prompt token
and one meta.json: format, dtypes, vocab_size, the tokenizer directory name, and per split the
token / target / sample counts, the mix of sources and each file's size and sha256.

Every sample ends with `<|endoftext|>` whose mask is 1 (the model learns to end). Plain documents
are all response (mask 1); chat samples are prompt (0) then the assistant turn (1).

The reader checks on open that both files exist and their sizes agree with each other and with
meta.json (always; cheap), and their sha256 with verify=True (reads everything): a missing,
truncated or corrupt shard is a DataError naming the file, not a crash in the middle of training.
Batches come from a seeded permutation of windows per epoch; `start_step` skips exactly the
batches already consumed (exact resume) and each rank takes a disjoint strided share.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np

from idlm.data import DataError

if TYPE_CHECKING:
    import torch
from idlm.data.io import atomic_writer, read_json, sha256_file, write_json
from idlm.errors import ConfigError

FORMAT = "idlm-shards-v1"
META = "meta.json"
TOKEN_DTYPE, MASK_DTYPE = np.uint16, np.uint8
_FLUSH_TOKENS = 1 << 23  # buffer this many tokens before writing


def shard_paths(path: str, split: str) -> dict[str, str]:
    """{"tokens": ..., "lossmask": ...} file paths of a split."""
    return {kind: os.path.join(path, f"{split}.{kind}.bin") for kind in ("tokens", "lossmask")}


def _check_split_name(split: str) -> None:
    if not isinstance(split, str) or not split or not split.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"split names are letters, digits, '-' and '_', got {split!r}")


def load_meta(path: str) -> dict:
    """meta.json of a dataset directory, validated; DataError naming the file otherwise."""
    meta_path = os.path.join(path, META)
    if not os.path.isdir(path):
        raise DataError(f"dataset directory not found: {path}")
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{meta_path} is not an {FORMAT} dataset description")
    if type(meta.get("vocab_size")) is not int or not isinstance(meta.get("splits"), dict):
        raise DataError(f"{meta_path} lacks vocab_size or splits")
    return meta


# ---------------------------------------------------------------------------------------------
# writing


def write_shards(
    out_dir: str,
    split: str,
    samples: Iterable[tuple],
    *,
    vocab_size: int,
    tokenizer: str | None = None,
) -> dict:
    """Write one split from samples (token_ids, n_prompt) or (token_ids, n_prompt, source); update meta.json.

    token_ids: the whole sample, ending with its separator; the first n_prompt tokens get loss mask
    0, the rest 1. `source` names the part of the mix a sample came from (default "data"). Returns
    the split's meta entry. Both files are written to temp names and renamed into place.
    """
    _check_split_name(split)
    if type(vocab_size) is not int or not 0 < vocab_size <= np.iinfo(TOKEN_DTYPE).max + 1:
        raise ConfigError(f"vocab_size must be in [1, 65536] for uint16 shards, got {vocab_size!r}")
    meta_path = os.path.join(out_dir, META)
    meta = {"format": FORMAT, "token_dtype": "uint16", "lossmask_dtype": "uint8", "vocab_size": vocab_size,
            "tokenizer": tokenizer, "splits": {}}
    if os.path.exists(meta_path):
        old = load_meta(out_dir)
        if old["vocab_size"] != vocab_size or old.get("tokenizer") != tokenizer:
            raise DataError(f"{meta_path} describes a dataset with vocab_size {old['vocab_size']} and tokenizer "
                            f"{old.get('tokenizer')!r}; write vocab_size {vocab_size} / {tokenizer!r} elsewhere")
        meta["splits"] = old["splits"]
    paths = shard_paths(out_dir, split)
    hashes = {k: hashlib.sha256() for k in paths}
    n_tokens = n_targets = n_samples = 0
    mix: dict[str, dict[str, int]] = {}
    buf_tok: list[np.ndarray] = []
    buf_mask: list[np.ndarray] = []
    buffered = 0
    with atomic_writer(paths["tokens"], "wb") as ftok, atomic_writer(paths["lossmask"], "wb") as fmask:

        def flush() -> None:
            for buf, f, key in ((buf_tok, ftok, "tokens"), (buf_mask, fmask, "lossmask")):
                data = np.concatenate(buf).tobytes() if buf else b""
                hashes[key].update(data)
                f.write(data)
                buf.clear()

        for sample in samples:
            ids, n_prompt, source = _unpack(sample, n_samples)
            arr = np.asarray(ids, dtype=np.int64)  # [n]
            if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
                raise DataError(f"sample {n_samples} has a token id outside [0, {vocab_size})")
            mask = np.ones(arr.size, dtype=MASK_DTYPE)  # [n]
            mask[:n_prompt] = 0
            buf_tok.append(arr.astype(TOKEN_DTYPE))
            buf_mask.append(mask)
            stats = mix.setdefault(source, {"samples": 0, "tokens": 0, "targets": 0})
            stats["samples"] += 1
            stats["tokens"] += int(arr.size)
            stats["targets"] += int(arr.size - n_prompt)
            n_tokens += int(arr.size)
            n_targets += int(arr.size - n_prompt)
            n_samples += 1
            buffered += int(arr.size)
            if buffered >= _FLUSH_TOKENS:
                flush()
                buffered = 0
        flush()
    info = {
        "tokens": n_tokens, "targets": n_targets, "samples": n_samples, "mix": dict(sorted(mix.items())),
        "files": {k: {"name": os.path.basename(p), "bytes": n_tokens * np.dtype(dt).itemsize,
                      "sha256": hashes[k].hexdigest()}
                  for (k, p), dt in zip(paths.items(), (TOKEN_DTYPE, MASK_DTYPE))},
    }
    meta["splits"][split] = info
    meta["splits"] = dict(sorted(meta["splits"].items()))
    write_json(meta_path, meta)
    return info


def _unpack(sample: tuple, index: int) -> tuple[Sequence[int], int, str]:
    if not isinstance(sample, tuple) or len(sample) not in (2, 3):
        raise DataError(f"sample {index} must be (token_ids, n_prompt) or (token_ids, n_prompt, source)")
    ids, n_prompt = sample[0], sample[1]
    source = sample[2] if len(sample) == 3 else "data"
    if type(n_prompt) is not int or not 0 <= n_prompt <= len(ids):
        raise DataError(f"sample {index}: n_prompt {n_prompt!r} is not in [0, {len(ids)}]")
    return ids, n_prompt, str(source)


# ---------------------------------------------------------------------------------------------
# reading


class TokenDataset:
    """Fixed-length windows of one split, memory-mapped.

    Window i covers stream positions i*seq_len .. i*seq_len + seq_len (seq_len + 1 tokens), so the
    target of position t is t + 1 and consecutive windows share one token.
    """

    def __init__(self, path: str | os.PathLike, split: str, seq_len: int, verify: bool = False) -> None:
        path = os.fspath(path)
        _check_split_name(split)
        if type(seq_len) is not int or seq_len < 1:
            raise ConfigError(f"seq_len must be a positive int, got {seq_len!r}")
        self.path, self.split, self.seq_len, self.verify = path, split, seq_len, verify
        meta = load_meta(path)
        info = meta["splits"].get(split)
        if info is None:
            raise DataError(f"{os.path.join(path, META)} has no split {split!r}; it has {sorted(meta['splits'])}")
        self.vocab_size: int = meta["vocab_size"]
        self.tokenizer: str | None = meta.get("tokenizer")
        self.n_tokens: int = int(info["tokens"])
        self.info = info
        files = shard_paths(path, split)
        self.tokens = self._open(files["tokens"], info["files"]["tokens"], TOKEN_DTYPE)  # uint16 [n_tokens]
        self.lossmask = self._open(files["lossmask"], info["files"]["lossmask"], MASK_DTYPE)  # uint8 [n_tokens]
        if self.num_windows < 1:
            raise DataError(f"split {split!r} of {path} has {self.n_tokens} tokens, fewer than one window of "
                            f"seq_len {seq_len} + 1")

    def _open(self, file: str, expect: dict, dtype) -> np.ndarray:
        if not os.path.isfile(file):
            raise DataError(f"shard file missing: {file}")
        size = os.path.getsize(file)
        want = self.n_tokens * np.dtype(dtype).itemsize
        if size != want or expect.get("bytes") != want:
            raise DataError(f"shard file truncated or corrupt: {file} has {size} bytes, meta.json says "
                            f"{self.n_tokens} tokens = {want} bytes")
        if self.verify and sha256_file(file) != expect.get("sha256"):
            raise DataError(f"shard file corrupt: sha256 of {file} differs from meta.json")
        if size == 0:
            return np.zeros(0, dtype=dtype)
        try:
            return np.memmap(file, dtype=dtype, mode="r", shape=(self.n_tokens,))
        except (OSError, ValueError) as e:
            raise DataError(f"cannot memory-map shard file {file}: {e}") from e

    def __getstate__(self) -> dict:  # DataLoader workers re-open the maps instead of pickling arrays
        return {"path": self.path, "split": self.split, "seq_len": self.seq_len, "verify": False}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    @property
    def num_windows(self) -> int:
        return max(0, (self.n_tokens - 1) // self.seq_len)

    def __len__(self) -> int:
        return self.num_windows

    def _gather(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows [B] → tokens int64 [B, L+1], lossmask bool [B, L+1]."""
        idx = windows[:, None].astype(np.int64) * self.seq_len + np.arange(self.seq_len + 1)  # [B, L+1]
        tokens = np.asarray(self.tokens[idx], dtype=np.int64)
        if tokens.size and tokens.max() >= self.vocab_size:
            raise DataError(f"shard file corrupt: {shard_paths(self.path, self.split)['tokens']} holds token id "
                            f"{int(tokens.max())} >= vocab_size {self.vocab_size}")
        mask = np.asarray(self.lossmask[idx]) != 0
        import torch  # (imported on use: the command line's parser imports this module)

        return torch.from_numpy(tokens), torch.from_numpy(mask)

    def window(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens int64 [L+1], lossmask bool [L+1]) of window i."""
        if not 0 <= i < self.num_windows:
            raise IndexError(f"window {i} out of range [0, {self.num_windows})")
        tokens, mask = self._gather(np.array([i]))
        return tokens[0], mask[0]

    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        """Whole global batches (batch_size windows on each of world_size ranks) in one epoch."""
        return self.num_windows // (batch_size * world_size)

    def permutation(self, seed: int, epoch: int) -> np.ndarray:
        """The window order of one epoch: a permutation seeded by (seed, epoch), the same on every rank."""
        return np.random.default_rng([seed, epoch]).permutation(self.num_windows)

    def batches(
        self,
        batch_size: int,
        seed: int,
        epoch: int = 0,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(tokens int64 [B, L+1], lossmask bool [B, L+1]) per step of one epoch, from step start_step on.

        Global step s takes windows perm[s*B*W : (s+1)*B*W]; rank r gets every W-th of them from r.
        The incomplete last global batch is dropped, so all ranks take the same number of steps.
        """
        for name, v, lo in (("batch_size", batch_size, 1), ("world_size", world_size, 1), ("seed", seed, 0),
                            ("epoch", epoch, 0), ("start_step", start_step, 0), ("rank", rank, 0)):
            if type(v) is not int or v < lo:
                raise ConfigError(f"{name} must be an int >= {lo}, got {v!r}")
        if rank >= world_size:
            raise ConfigError(f"rank {rank} must be < world_size {world_size}")
        steps = self.steps_per_epoch(batch_size, world_size)
        if steps == 0:
            raise DataError(f"split {self.split!r} of {self.path} has {self.num_windows} windows of {self.seq_len}, "
                            f"fewer than one global batch of {batch_size} x {world_size}")
        if start_step > steps:
            raise ConfigError(f"start_step {start_step} is past the end of the epoch ({steps} steps)")
        return self._batches(batch_size, seed, epoch, start_step, rank, world_size, steps)

    def _batches(self, batch_size, seed, epoch, start_step, rank, world_size, steps):
        perm = self.permutation(seed, epoch)
        per_step = batch_size * world_size
        for step in range(start_step, steps):
            yield self._gather(perm[step * per_step : (step + 1) * per_step][rank::world_size])
