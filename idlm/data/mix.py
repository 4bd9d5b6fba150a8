"""`idlm data mix`: one shard dataset from several, in given proportions of tokens (e.g. a model's own
self-distilled responses and general text, for converting it; issue 15).

The shards keep no sample index, but their layout gives the boundaries back (`sample_bounds`): every
sample is its prompt (loss mask 0) then its response (mask 1), and it ends either with the end-of-text
token (mask 1) or, for a response cut at max_tokens, at the next sample's first prompt token (a 1 → 0
step of the mask). Whole samples are then drawn from each source in a seeded order until the source's
share of the tokens is reached, and all of them are written shuffled together (`write_shards`), each
tagged with its source's name, so meta.json's mix shows what came from where. The sources must share
one tokenizer (the same tokenizer.json); it is copied next to the new shards.
"""

from __future__ import annotations

import argparse
import os
import shutil

import numpy as np

from idlm.data import DataError
from idlm.data.shards import TokenDataset, load_meta, write_shards
from idlm.errors import ConfigError
from idlm.tokenizer import Tokenizer

SPLITS = ("train", "heldout")


def sample_bounds(tokens: np.ndarray, lossmask: np.ndarray, eot: int) -> np.ndarray:
    """Start offsets of the samples of a shard stream (and its length last): a sample starts at 0, after
    an end-of-text token that is a target, and where the loss mask steps from 1 to 0. [n_samples + 1]."""
    n = len(tokens)
    if n == 0:
        return np.zeros(1, dtype=np.int64)
    t, m = np.asarray(tokens), np.asarray(lossmask).astype(bool)
    after_eot = np.flatnonzero((t[:-1] == eot) & m[:-1]) + 1
    mask_drop = np.flatnonzero(m[:-1] & ~m[1:]) + 1
    starts = np.unique(np.concatenate([[0], after_eot, mask_drop]).astype(np.int64))
    return np.concatenate([starts, [n]])


def _shares(tokens: list[int], weights: list[float], total: int | None) -> list[int]:
    """Tokens to take from each source: weights' shares of `total`, or of the largest total the sources
    can all supply at these weights."""
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    if total is None:
        total = int(min(n / wi for n, wi in zip(tokens, w)))
    want = [int(round(total * wi)) for wi in w]
    for i, (need, have) in enumerate(zip(want, tokens)):
        if need > have:
            raise DataError(f"source {i} has {have} tokens, fewer than its share of {need} of {total}")
    return want


def mix_datasets(out: str, sources: list[tuple[str, float]], total_tokens: int | None = None, seed: int = 0,
                 names: list[str] | None = None) -> dict:
    """Write the mix of `sources` [(dataset dir, weight)] into `out`: per split, every source's share of
    the tokens (`total_tokens` for train, or the most the sources allow; heldout always as much as the
    sources allow) as whole samples. Returns {split: write_shards' info} and writes it to mix.json."""
    if not sources:
        raise ConfigError("give at least one source dataset", param="from")
    if any(w <= 0 for _, w in sources):
        raise ConfigError(f"weights must be > 0, got {[w for _, w in sources]}", param="from")
    names = names or [os.path.basename(os.path.normpath(p)) for p, _ in sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"source names must differ, got {names}", param="from")
    metas = [load_meta(p) for p, _ in sources]
    vocab = {m["vocab_size"] for m in metas}
    if len(vocab) != 1:
        raise DataError(f"the sources have different vocabularies ({sorted(vocab)}): they need one tokenizer")
    tok_dirs = [os.path.join(p, m.get("tokenizer") or "tokenizer") for (p, _), m in zip(sources, metas)]
    texts = []
    for d in tok_dirs:
        f = os.path.join(d, "tokenizer.json")
        if not os.path.isfile(f):
            raise DataError(f"{f} is missing: a mix needs each source's tokenizer to check they are the same")
        texts.append(open(f, encoding="utf-8").read())
    if len(set(texts)) != 1:
        raise DataError("the sources were encoded with different tokenizers (their tokenizer.json differ)")
    tok = Tokenizer.from_dir(tok_dirs[0])
    from idlm.data.build import end_of_text_id

    eot = end_of_text_id(tok)
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    report = {}
    for split in SPLITS:
        if not all(split in m["splits"] for m in metas):
            continue
        streams = []
        for p, _ in sources:
            ds = TokenDataset(p, split, 1)
            tokens, mask = np.asarray(ds.tokens), np.asarray(ds.lossmask)
            streams.append((tokens, mask, sample_bounds(tokens, mask, eot)))
        shares = _shares([len(s[0]) for s in streams], [w for _, w in sources],
                         total_tokens if split == "train" else None)
        chosen = []  # (source index, start, end)
        for i, ((tokens, mask, bounds), share) in enumerate(zip(streams, shares)):
            taken = 0
            for k in rng.permutation(len(bounds) - 1):
                if taken >= share:
                    break
                start, end = int(bounds[k]), int(bounds[k + 1])
                chosen.append((i, start, end))
                taken += end - start
        order = rng.permutation(len(chosen))

        def samples():
            for j in order:
                i, start, end = chosen[j]
                tokens, mask, _ = streams[i]
                ids = tokens[start:end].astype(np.int64)
                n_prompt = int(np.argmax(mask[start:end] > 0)) if mask[start:end].any() else end - start
                yield ids, n_prompt, names[i]

        report[split] = write_shards(out, split, samples(), vocab_size=metas[0]["vocab_size"], tokenizer="tokenizer")
    if not report:
        raise DataError("the sources share no split (train / heldout)")
    dst = os.path.join(out, "tokenizer")
    if os.path.abspath(dst) != os.path.abspath(tok_dirs[0]):
        shutil.copytree(tok_dirs[0], dst, dirs_exist_ok=True)
    from idlm.data.io import write_json

    summary = {"sources": [{"path": p, "weight": w, "name": n} for (p, w), n in zip(sources, names)],
               "seed": seed, "total_tokens": total_tokens, "splits": report}
    write_json(os.path.join(out, "mix.json"), summary)
    return summary


def parse_source(text: str) -> tuple[str, float]:
    """"PATH" or "PATH:WEIGHT" (weight default 1)."""
    path, sep, weight = text.rpartition(":")
    if not sep:
        return text, 1.0
    try:
        w = float(weight)
    except ValueError:
        return text, 1.0  # a ':' that is part of the path
    if not w > 0:
        raise argparse.ArgumentTypeError(f"the weight of {path!r} must be > 0, got {weight!r}")
    return path, w


def add_mix_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="the mixed dataset's directory")
    p.add_argument("--from", dest="sources", action="append", required=True, type=parse_source,
                   help="a source dataset, PATH or PATH:WEIGHT (weights are token shares; default 1); repeat")
    p.add_argument("--tokens", type=int, default=None,
                   help="train tokens in all (default: the most the sources allow at these weights)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample draw and order")


def cmd_mix(args) -> dict:
    return mix_datasets(args.out, args.sources, args.tokens, args.seed)
