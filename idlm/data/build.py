"""Build a training dataset end to end: corpus → tokenizer → shards → held-out eval sets.

Why one entry point: the pieces only make sense together (the tokenizer must be trained on the
same corpus its shards are cut from, eval sets must come from files training never saw, synthetic
train tasks must not repeat eval prompts), and a training run should name one directory whose
meta.json and build.json say exactly what went in. Layout of `out_dir`:

    corpus/        manifest.jsonl, corpus.json, corpus-{train,heldout}.jsonl   (idlm.data.corpus)
    tokenizer/     tokenizer.json, tokenizer_config.json, generation_config.json
    train.tokens.bin, train.lossmask.bin, heldout.tokens.bin, heldout.lossmask.bin, meta.json
    eval/tasks.jsonl          synthetic tasks from the eval streams (the committed file is a prefix)
    eval/instructions.jsonl   instruction pairs mined from held-out files only
    build.json                the config and a summary (files, tokens per split, vocab, timings)

train = corpus train documents + synthetic tasks (chat) + instruction pairs from train files (chat);
heldout = corpus held-out documents (for a held-out loss). Contamination guards: synthetic train
tasks whose prompt is an eval prompt, and train pairs whose function is an eval answer, are removed.
Documents are encoded with special-token strings treated as text; chat pairs whose text contains a
special-token string are dropped (they would forge turn boundaries).

Speed: file inspection and `ast` mining run in a process pool; tokenizer training and encoding
(`encode_batch`) use all cores inside `tokenizers`. Every output file is written atomically.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator

from tqdm import tqdm

from idlm.data import DataError
from idlm.data import corpus as corpus_mod
from idlm.data.instructions import mine_rows, to_messages
from idlm.data.io import json_line, read_jsonl, unit_hash, write_json, write_jsonl
from idlm.data.parallel import default_workers, process_pool
from idlm.data.shards import META, TokenDataset, write_shards
from idlm.data.synthetic import EVAL_SEED, eval_tasks, make_split
from idlm.data.tokenizer_train import SPECIAL_TOKENS, plain_text_backend, train_tokenizer
from idlm.errors import ConfigError, IdlmError
from idlm.eval.tasks import COMMITTED_TASKS
from idlm.tokenizer import Tokenizer

TOKENIZER_DIR = "tokenizer"
_ENCODE_CHUNK = 1024  # samples per encode_batch call
Sample = tuple[list[int], int, str]  # (token ids, n_prompt, source) as write_shards takes them
_TOKENIZER_TASK_TEXTS = 20_000  # synthetic tasks shown to the tokenizer trainer (digits, operators, words)


@dataclass(frozen=True)
class BuildConfig:
    """Everything a dataset build depends on (written to build.json); validated on construction."""

    out_dir: str
    roots: tuple[str, ...] | None = None  # None: this interpreter's stdlib + purelib
    vocab_size: int = 12000
    n_synthetic: int = 200_000  # synthetic train tasks
    n_eval: int = 500  # eval tasks per kind, and at most this many eval instruction pairs
    seed: int = 0
    max_files: int | None = None
    max_file_bytes: int = 200_000
    holdout_fraction: float = 0.02
    tokenizer_bytes: int = 100_000_000  # at most this much corpus text trains the tokenizer
    eval_max_bytes: int = 1_900_000  # each eval JSONL stays below this (they are small enough to commit)
    workers: int | None = None  # processes for inspection and mining; None: min(cpu_count, 16)
    # encode with this model's tokenizer (a known name, checkpoint dir or .gguf) instead of training one:
    # data for converting that model (its <|endoftext|>, else its end token, separates samples)
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise ConfigError("out_dir must be a non-empty path")
        if self.roots is not None:
            if isinstance(self.roots, str) or not self.roots:
                raise ConfigError("roots must be None or a non-empty list of directories")
            object.__setattr__(self, "roots", tuple(self.roots))
        for name in ("vocab_size", "n_eval", "tokenizer_bytes", "eval_max_bytes", "max_file_bytes"):
            v = getattr(self, name)
            if type(v) is not int or v <= 0:
                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        for name in ("n_synthetic", "seed"):
            v = getattr(self, name)
            if type(v) is not int or v < 0:
                raise ConfigError(f"{name} must be a non-negative int, got {v!r}")
        if self.workers is not None and (type(self.workers) is not int or self.workers < 1):
            raise ConfigError(f"workers must be a positive int or None, got {self.workers!r}")
        # vocab_size, max_files and holdout_fraction are checked by the stage that uses them


def build_dataset(
    out_dir: str,
    roots: list[str] | None = None,
    vocab_size: int = 12000,
    n_synthetic: int = 200_000,
    n_eval: int = 500,
    seed: int = 0,
    max_files: int | None = None,
    *,
    progress: bool = True,
    **kwargs,
) -> dict:
    """Run the whole pipeline into out_dir; return (and write to build.json) a summary dict.

    kwargs are the other BuildConfig fields (max_file_bytes, holdout_fraction, tokenizer_bytes,
    eval_max_bytes, workers). The summary has files / dropped (corpus), vocab_size, tokens and targets
    per split, the train mix, eval set sizes and seconds per stage.
    """
    cfg = BuildConfig(out_dir, tuple(roots) if roots is not None else None, vocab_size, n_synthetic, n_eval, seed,
                      max_files, **kwargs)
    return run_build(cfg, progress=progress)


def run_build(cfg: BuildConfig, progress: bool = True) -> dict:
    """The pipeline for a validated config (see the module docstring for the stages and layout)."""
    t0 = time.time()
    timings: dict[str, float] = {}
    out = cfg.out_dir
    corpus_dir, eval_dir = os.path.join(out, "corpus"), os.path.join(out, "eval")
    workers = default_workers() if cfg.workers is None else cfg.workers

    def lap(name: str) -> None:
        timings[name] = round(time.time() - t0 - sum(timings.values()), 2)

    manifest = corpus_mod.build_corpus(
        list(cfg.roots) if cfg.roots is not None else None, corpus_dir, cfg.max_file_bytes, cfg.holdout_fraction,
        cfg.seed, max_files=cfg.max_files, workers=workers, progress=progress,
    )
    if not manifest.split("train"):
        raise DataError(f"the corpus under {list(manifest.roots)} kept no training files (dropped: {manifest.dropped})")
    lap("corpus")

    # eval sets first: everything for training is decontaminated against them
    tasks_eval = eval_tasks(cfg.n_eval, EVAL_SEED)
    eval_prompts = {t["prompt"] for t in tasks_eval} | _committed_prompts()
    _write_capped(os.path.join(eval_dir, "tasks.jsonl"), tasks_eval, cfg.eval_max_bytes)
    tasks_train = [t for t in make_split(cfg.n_synthetic, cfg.seed, "train") if t["prompt"] not in eval_prompts]
    lap("synthetic")

    with process_pool(workers) as imap:  # forked before tokenizers starts its threads
        pairs_eval = _dedup(mine_rows(corpus_mod.iter_corpus(corpus_dir, "heldout"), imap=imap), set())
        pairs_eval = _select_eval_pairs(pairs_eval, cfg.n_eval, cfg.eval_max_bytes)
        eval_answers = {p["assistant"] for p in pairs_eval} | {p["user"] for p in pairs_eval}
        rows = tqdm(corpus_mod.iter_corpus(corpus_dir, "train"), total=len(manifest.split("train")),
                    desc="instructions: mine", unit="file", disable=not progress)
        pairs_train = _dedup(mine_rows(rows, imap=imap), eval_answers)
    write_jsonl(os.path.join(eval_dir, "instructions.jsonl"), pairs_eval)
    lap("instructions")

    if cfg.tokenizer is None:
        tok = train_tokenizer(_tokenizer_texts(corpus_dir, manifest, cfg, tasks_train),
                              os.path.join(out, TOKENIZER_DIR), cfg.vocab_size, progress=progress)
    else:
        from idlm.models.loader import load_tokenizer

        tok = load_tokenizer(cfg.tokenizer)
        tok.save(os.path.join(out, TOKENIZER_DIR))
    eot = end_of_text_id(tok)
    lap("tokenizer")

    vocab = tok.vocab_size
    stale_meta = os.path.join(out, META)
    if os.path.exists(stale_meta):  # a previous build's description must not survive next to new shards
        os.remove(stale_meta)
    train_samples = _chain(
        _document_samples(tok, corpus_mod.iter_corpus(corpus_dir, "train"), "corpus", eot),
        _chat_samples(tok, ((t["prompt"], t["answer"]) for t in tasks_train), "synthetic", eot),
        _chat_samples(tok, ((p["user"], p["assistant"]) for p in pairs_train), "instructions", eot),
    )
    n_train_docs = len(manifest.split("train"))
    bar = dict(desc="shards: train", unit="sample", disable=not progress,
               total=n_train_docs + len(tasks_train) + len(pairs_train))
    train_info = write_shards(out, "train", tqdm(train_samples, **bar), vocab_size=vocab, tokenizer=TOKENIZER_DIR)
    heldout_docs = _document_samples(tok, corpus_mod.iter_corpus(corpus_dir, "heldout"), "corpus", eot)
    heldout_info = write_shards(out, "heldout", heldout_docs, vocab_size=vocab, tokenizer=TOKENIZER_DIR)
    lap("shards")

    summary = {
        "config": asdict(cfg),
        "roots": list(manifest.roots),
        "files": {s: len(manifest.split(s)) for s in corpus_mod.SPLITS},
        "dropped": manifest.dropped,
        "vocab_size": vocab,
        "tokens": {"train": train_info["tokens"], "heldout": heldout_info["tokens"]},
        "targets": {"train": train_info["targets"], "heldout": heldout_info["targets"]},
        "mix": {"train": train_info["mix"], "heldout": heldout_info["mix"]},
        "eval": {"tasks": len(tasks_eval), "instructions": len(pairs_eval)},
        "synthetic_train": len(tasks_train),
        "instruction_pairs_train": len(pairs_train),
        "seconds": timings,
    }
    summary["seconds"]["total"] = round(time.time() - t0, 2)
    write_json(os.path.join(out, "build.json"), summary)
    return summary


# ---------------------------------------------------------------------------------------------
# helpers


def _committed_prompts() -> set[str]:
    if not os.path.isfile(COMMITTED_TASKS):
        return set()
    return {t["prompt"] for t in read_jsonl(COMMITTED_TASKS)}


def _has_special(*texts: str) -> bool:
    return any(s in t for t in texts for s in SPECIAL_TOKENS)


def _dedup(pairs: Iterable[dict], exclude: set[str]) -> list[dict]:
    """Pairs in order, without repeated functions, excluded texts or special-token strings."""
    seen: set[str] = set()
    out = []
    for p in pairs:
        a = p["assistant"]
        if a in seen or a in exclude or p["user"] in exclude or _has_special(p["user"], a):
            continue
        seen.add(a)
        out.append(p)
    return out


def _select_eval_pairs(pairs: list[dict], n: int, max_bytes: int) -> list[dict]:
    """At most n pairs (and max_bytes of JSONL), picked by a hash of (path, name), kept in source order."""
    order = sorted(range(len(pairs)), key=lambda i: unit_hash(f"eval/{pairs[i]['path']}/{pairs[i]['name']}"))
    chosen, size = [], 0
    for i in order[:n]:
        line = len(json_line(pairs[i]).encode("utf-8"))
        if size + line > max_bytes:
            continue
        chosen.append(i)
        size += line
    return [pairs[i] for i in sorted(chosen)]


def _write_capped(path: str, rows: list[dict], max_bytes: int) -> None:
    size = sum(len(json_line(r).encode("utf-8")) for r in rows)
    if size > max_bytes:
        raise ConfigError(f"{path} would be {size} bytes (> {max_bytes}): lower n_eval")
    write_jsonl(path, rows)


def _tokenizer_texts(corpus_dir: str, manifest: corpus_mod.Manifest, cfg: BuildConfig,
                     tasks: list[dict]) -> Iterator[str]:
    """Train documents (a path-hash sample of about tokenizer_bytes) then a few thousand task texts."""
    total = sum(e.bytes for e in manifest.split("train"))
    keep = min(1.0, cfg.tokenizer_bytes / max(total, 1))
    for row in corpus_mod.iter_corpus(corpus_dir, "train"):
        if keep >= 1.0 or unit_hash(f"tokenizer/{cfg.seed}/{row['root']}/{row['path']}") < keep:
            yield row["text"]
    for t in tasks[:_TOKENIZER_TASK_TEXTS]:
        yield t["prompt"] + "\n" + t["answer"]


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _chain(*iterables: Iterable) -> Iterator:
    for it in iterables:
        yield from it


def end_of_text_id(tok: Tokenizer) -> int:
    """The token that ends every sample: <|endoftext|> where the tokenizer has it, else its end token."""
    eot = tok.token_to_id("<|endoftext|>")
    eot = eot if eot is not None else tok.eos_token_id
    if eot is None:
        raise DataError("the tokenizer has neither <|endoftext|> nor an end token to separate samples with")
    return eot


def _document_samples(tok: Tokenizer, rows: Iterable[dict], source: str, eot: int) -> Iterator[Sample]:
    """(ids + [eot], 0, source) per document; special-token strings in the text stay text."""
    backend = plain_text_backend(tok)
    for chunk in _chunks(rows, _ENCODE_CHUNK):
        for enc in backend.encode_batch([r["text"] for r in chunk], add_special_tokens=False):
            yield [*enc.ids, eot], 0, source


def chat_texts(tok: Tokenizer, user: str, assistant: str) -> tuple[str, str]:
    """(prompt text, response text): the rendering of the user turn with the generation prompt, and the rest."""
    prompt = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)
    full = tok.apply_chat_template(to_messages({"user": user, "assistant": assistant}), add_generation_prompt=False)
    if not full.startswith(prompt):
        raise DataError("the chat template's generation prompt is not a prefix of the rendered conversation")
    return prompt, full[len(prompt) :]


def _chat_samples(tok: Tokenizer, pairs: Iterable[tuple[str, str]], source: str, eot: int) -> Iterator[Sample]:
    """(prompt ids + response ids + [eot], len(prompt ids), source) per (user, assistant) pair.

    Prompt and response are encoded separately — exactly what the model sees at inference (the
    prompt encoded by the server, then its own tokens) — which equals encoding the whole rendering
    whenever the answer does not start with whitespace before a newline (true for all our data).
    """
    for chunk in _chunks(pairs, _ENCODE_CHUNK):
        texts = [chat_texts(tok, u, a) for u, a in chunk]
        prompts = tok.backend.encode_batch([p for p, _ in texts], add_special_tokens=False)
        responses = tok.backend.encode_batch([r for _, r in texts], add_special_tokens=False)
        for p, r in zip(prompts, responses):
            yield [*p.ids, *r.ids, eot], len(p.ids), source


# ---------------------------------------------------------------------------------------------
# command line (the `idlm data build` subcommand delegates here)


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="dataset directory to create or overwrite")
    p.add_argument("--roots", nargs="+", default=None,
                   help="directories of Python source (default: this Python's stdlib and site-packages)")
    p.add_argument("--vocab-size", type=int, default=12000, help="BPE tokenizer vocabulary size")
    p.add_argument("--n-synthetic", type=int, default=200_000, help="synthetic train tasks")
    p.add_argument("--n-eval", type=int, default=500, help="eval tasks per kind; most eval instruction pairs")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic tasks and shuffles")
    p.add_argument("--max-files", type=int, default=None,
                   help="consider at most this many files (quick runs; default: all)")
    p.add_argument("--holdout-fraction", type=float, default=0.02, help="share of files held out (by path hash)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: min(CPU count, 16))")
    p.add_argument("--tokenizer", default=None,
                   help="encode with this model's tokenizer (known name, checkpoint dir or .gguf) instead of "
                        "training one, e.g. smollm2-135m-instruct (data to convert that model); default: train")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def cmd_build(args: argparse.Namespace) -> dict:
    """Build from parsed arguments, check the shards open, return the summary."""
    summary = build_dataset(
        args.out, args.roots, args.vocab_size, args.n_synthetic, args.n_eval, args.seed, args.max_files,
        progress=not args.no_progress, holdout_fraction=args.holdout_fraction, workers=args.workers,
        tokenizer=args.tokenizer,
    )
    for split in ("train", "heldout"):
        if summary["tokens"][split] > 1:
            TokenDataset(args.out, split, 1)
    return summary


if __name__ == "__main__":
    import json
    import sys

    parser = argparse.ArgumentParser(prog="python -m idlm.data.build", description="Build an idlm training dataset.")
    add_build_arguments(parser)
    try:
        print(json.dumps(cmd_build(parser.parse_args()), indent=2))
    except IdlmError as e:  # the one-line error the CLI prints too
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
