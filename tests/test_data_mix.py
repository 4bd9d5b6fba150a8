"""`idlm data mix` (idlm.data.mix): sample boundaries recovered from the shard layout, token shares,
whole samples only, one tokenizer."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from tiny import write_tiny_tokenizer

from idlm.cli import main
from idlm.data import DataError
from idlm.data.mix import mix_datasets, parse_source, sample_bounds
from idlm.data.shards import TokenDataset, write_shards

EOT = 0  # the tiny tokenizer's <|endoftext|>


def _samples(rng, n, source, cut_some=False):
    """(ids, n_prompt, source): chat samples (prompt 0s, response 1s, end token), documents (n_prompt 0),
    and with cut_some responses cut before their end token (as distillation writes at max_tokens)."""
    out = []
    for i in range(n):
        prompt = rng.integers(10, 200, rng.integers(0, 6)).tolist()
        resp = rng.integers(10, 200, rng.integers(1, 9)).tolist()
        end = [] if cut_some and i % 3 == 0 and prompt else [EOT]
        out.append((prompt + resp + end, len(prompt), source))
    return out


def test_sample_bounds_recover_every_sample():
    rng = np.random.default_rng(0)
    samples = _samples(rng, 60, "a", cut_some=True)
    tokens = np.concatenate([np.asarray(s[0]) for s in samples])
    mask = np.concatenate([np.r_[np.zeros(s[1]), np.ones(len(s[0]) - s[1])] for s in samples]).astype(np.uint8)
    bounds = sample_bounds(tokens, mask, EOT)
    want = np.cumsum([0] + [len(s[0]) for s in samples])
    # a cut response followed by a document (no prompt) would merge with it; none here has no prompt after
    # a cut one unless it is a document: compare on the boundaries the layout can show
    assert set(bounds.tolist()) <= set(want.tolist()) and bounds[-1] == len(tokens)
    visible = [b for k, b in enumerate(want[1:-1], 1) if samples[k][1] > 0 or samples[k - 1][0][-1] == EOT]
    assert set(visible) <= set(bounds.tolist())
    assert sample_bounds(np.zeros(0, np.uint16), np.zeros(0, np.uint8), EOT).tolist() == [0]


@pytest.fixture()
def sources(tmp_path):
    tok = write_tiny_tokenizer(tmp_path / "tok")
    rng = np.random.default_rng(1)
    out = []
    for name, n in (("distill", 400), ("text", 300)):
        d = tmp_path / name
        for split, k in (("train", n), ("heldout", 40)):
            write_shards(str(d), split, _samples(rng, k, "x", cut_some=name == "distill"), vocab_size=600,
                         tokenizer="tokenizer")
        shutil.copytree(tok, d / "tokenizer")
        out.append(d)
    return out


def test_mix_takes_token_shares_of_whole_samples(sources, tmp_path):
    a, b = sources
    total = 2000
    summary = mix_datasets(str(tmp_path / "mix"), [(str(a), 3.0), (str(b), 1.0)], total_tokens=total, seed=0)
    mix = summary["splits"]["train"]["mix"]
    assert set(mix) == {"distill", "text"}
    assert abs(mix["distill"]["tokens"] - 1500) < 12 and abs(mix["text"]["tokens"] - 500) < 12  # < a sample over
    ds = TokenDataset(tmp_path / "mix", "train", 8, verify=True)
    assert ds.n_tokens == mix["distill"]["tokens"] + mix["text"]["tokens"]
    # every written sample is one source sample, token for token and mask for mask
    src = {}
    for d in (a, b):
        t = TokenDataset(d, "train", 1)
        tokens, mask = np.asarray(t.tokens), np.asarray(t.lossmask)
        bounds = sample_bounds(tokens, mask, EOT)
        for s, e in zip(bounds[:-1], bounds[1:]):
            src[(tuple(tokens[s:e]), tuple(mask[s:e]))] = True
    tokens, mask = np.asarray(ds.tokens), np.asarray(ds.lossmask)
    lengths = sorted({len(k[0]) for k in src})
    reach = np.zeros(len(tokens) + 1, dtype=bool)  # the stream parses as a concatenation of source samples
    reach[0] = True
    for p in range(len(tokens)):
        if reach[p]:
            for n in lengths:
                if p + n <= len(tokens) and (tuple(tokens[p:p + n]), tuple(mask[p:p + n])) in src:
                    reach[p + n] = True
    assert reach[len(tokens)]
    assert (tmp_path / "mix" / "tokenizer" / "tokenizer.json").exists() and "heldout" in summary["splits"]
    # deterministic
    again = mix_datasets(str(tmp_path / "mix2"), [(str(a), 3.0), (str(b), 1.0)], total_tokens=total, seed=0)
    assert again["splits"] == summary["splits"]


def test_mix_errors_and_cli(sources, tmp_path, capsys):
    a, b = sources
    with pytest.raises(DataError, match="fewer than its share"):
        mix_datasets(str(tmp_path / "m"), [(str(a), 1.0), (str(b), 1.0)], total_tokens=10**7)
    other = tmp_path / "other"
    shutil.copytree(b, other)
    (other / "tokenizer" / "tokenizer.json").write_text((other / "tokenizer" / "tokenizer.json").read_text()
                                                        .replace("<|im_end|>", "<|im_fin|>"))
    with pytest.raises(DataError, match="different tokenizers"):
        mix_datasets(str(tmp_path / "m2"), [(str(a), 1.0), (str(other), 1.0)])
    assert parse_source("runs/x:0.25") == ("runs/x", 0.25) and parse_source("runs/x") == ("runs/x", 1.0)
    assert main(["data", "mix", "--out", str(tmp_path / "m3"), "--from", f"{a}:1", "--from", f"{b}:1"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    train = out["splits"]["train"]["mix"]
    assert abs(train["distill"]["tokens"] - train["text"]["tokens"]) < 12  # equal shares, as much as b allows
    with pytest.raises(SystemExit) as e:  # argparse: a bad weight is a usage error
        main(["data", "mix", "--out", str(tmp_path / "m4"), "--from", f"{a}:-1"])
    assert e.value.code == 2 and "must be > 0" in capsys.readouterr().err
