"""The offline data pipeline: corpus → tokenizer → memory-mapped token shards → held-out eval sets.

Training a small I-DLM needs text that is (a) available without network on any machine, (b)
reproducible from a manifest, and (c) checkable. So the pipeline builds everything from what the
machine already holds and from generators whose answers a program can verify:

- `corpus`: Python source of the standard library and installed packages, filtered, de-duplicated,
  split into train / held-out by a hash of each file's root-relative path, with a manifest of
  paths and sha256 (same inputs → byte-identical manifest).
- `synthetic`: arithmetic, Python-expression, copy and reverse tasks with answers `check()` verifies.
- `instructions`: (signature + docstring → function) chat pairs mined from the corpus with `ast`.
- `tokenizer_train`: a byte-level BPE with the ChatML chat template and the `<|MASK|>` token.
- `shards`: the on-disk training format (uint16 tokens + uint8 loss mask + meta.json) and its
  memory-mapped, resumable, rank-sharded reader.
- `build`: runs all of it end to end into one dataset directory.
- `io` (atomic writes, canonical JSONL, sha256) and `parallel` (an ordered process-pool map).

Submodules are imported on use (none is imported here) so `import idlm.data` stays cheap.
"""

from idlm.errors import IdlmError


class DataError(IdlmError):
    """A dataset file is missing, corrupt or inconsistent, or a data-pipeline input is unusable."""


__all__ = ["DataError"]
