"""Giving a model without a MASK token one before converting it (issue 15: SmolLM2 has none): the new
vocabulary row, the tokenizer's new special token, and `add_mask_token` in a convert run, resumed."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import crash_in_step, tiny_transformer, write_tiny_checkpoint, write_tiny_tokenizer

from idlm.errors import ConfigError
from idlm.tokenizer import Tokenizer


@pytest.mark.parametrize("tied", [False, True])
def test_add_vocab_rows_keeps_the_old_rows_and_outputs(tied):
    model = tiny_transformer(50, tie_word_embeddings=tied)
    ids = torch.tensor([[1, 7, 49, 3]])
    with torch.no_grad():
        before = model.compute_logits(model(ids))
    old_emb = model.model.embed_tokens.weight.clone()
    assert model.add_vocab_rows(1) == 50 and model.config.vocab_size == 51
    emb = model.model.embed_tokens.weight
    assert emb.shape == (51, 32) and torch.equal(emb[:50], old_emb)
    torch.testing.assert_close(emb[50], old_emb.mean(0))
    with torch.no_grad():
        after = model.compute_logits(model(torch.tensor([[1, 7, 49, 3]])))
        model(torch.tensor([[50, 2]]))  # the new id is a valid input
    assert after.shape[-1] == 51
    torch.testing.assert_close(after[..., :50], before)  # old tokens' logits unchanged
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError):
        model.add_vocab_rows(0)


def test_tokenizer_add_mask_token_round_trip(tmp_path):
    from tiny import SPECIALS

    path = write_tiny_tokenizer(tmp_path / "tok", specials=[t for t in SPECIALS if t != "<|MASK|>"])
    tok = Tokenizer.from_dir(path)
    n = tok.vocab_size
    assert tok.mask_token_id is None
    assert tok.add_mask_token() == n and tok.mask_token_id == n and tok.vocab_size == n + 1
    assert tok.add_mask_token() == n  # idempotent
    assert tok.encode("a<|MASK|>b").count(n) == 1  # one special token, never split
    tok.save(tmp_path / "saved")
    again = Tokenizer.from_dir(tmp_path / "saved")
    assert again.mask_token_id == n and again.vocab_size == n + 1
    with pytest.raises(ValueError, match="MASK"):
        Tokenizer.from_dir(path).add_mask_token("<mask>")
    has = Tokenizer.from_dir(write_tiny_tokenizer(tmp_path / "tok2"))
    assert has.add_mask_token() == has.mask_token_id != has.vocab_size  # it keeps the one it has


@pytest.fixture(scope="module")
def no_mask_run(tmp_path_factory):
    """A checkpoint without a MASK token and shards of its own token ids."""
    from idlm.data.shards import write_shards

    root = tmp_path_factory.mktemp("nomask")
    ckpt = write_tiny_checkpoint(root / "base", mask=False)
    tok = Tokenizer.from_dir(ckpt)
    g = torch.Generator().manual_seed(0)
    samples = [(torch.randint(10, tok.vocab_size, (40,), generator=g).tolist(), 8) for _ in range(64)]
    for split in ("train", "heldout"):
        write_shards(str(root / "data"), split, samples, vocab_size=tok.vocab_size)
    return root, ckpt, tok.vocab_size


def _cfg(root, ckpt, out, **kw):
    from idlm.training.config import TrainConfig

    base = dict(kind="convert", data=str(root / "data"), out=str(out), init=str(ckpt), seq_len=16, batch_size=4,
                max_steps=6, lr=1e-3, log_every=1, eval_every=3, eval_batches=1, save_every=3, seed=0,
                curriculum=[[1.0, 3]], add_mask_token=True)
    base.update(kw)
    return TrainConfig.from_dict(base)


def test_convert_adds_a_mask_token_and_resumes_exactly(no_mask_run, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from idlm.decoding import make_decoder
    from idlm.decoding.reference import generate
    from idlm.decoding.sampling import SamplingParams
    from idlm.models.loader import load_pretrained
    from idlm.training.trainer import Trainer

    root, ckpt, vocab = no_mask_run
    with pytest.raises(ConfigError, match="MASK"):  # without the option: the old, clear refusal
        Trainer(_cfg(root, ckpt, tmp_path / "x", add_mask_token=False))
    Trainer(_cfg(root, ckpt, tmp_path / "a")).train()
    t = Trainer(_cfg(root, ckpt, tmp_path / "b"))
    crash_in_step(monkeypatch, t, 5)  # after the checkpoint of step 3
    with pytest.raises(KeyboardInterrupt):
        t.train()
    monkeypatch.undo()
    Trainer(_cfg(root, ckpt, tmp_path / "b")).train(resume=True)
    a, b = (load_file(str(tmp_path / r / "final" / "model.safetensors")) for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    curves = []
    for r in "ab":  # step -> loss; the resumed run logs steps 4.. again: its later entries count
        rows = [json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
        curves.append({row["step"]: row["loss"] for row in rows if "loss" in row})
    assert curves[0] == curves[1] and sorted(curves[0]) == [1, 2, 3, 4, 5, 6]  # identical loss curves
    model, tok = load_pretrained(tmp_path / "a" / "final")
    assert model.config.vocab_size == tok.vocab_size == vocab + 1 and model.config.mask_token_id == tok.mask_token_id
    assert tok.mask_token_id == vocab
    out = generate(model, make_decoder("isd", 3, model.config, tok), [[12, 13, 14]],
                   SamplingParams(temperature=0, max_tokens=6))
    assert 1 <= len(out[0].token_ids) <= 6


def test_add_mask_token_is_for_conversions_only():
    from idlm.training.config import TrainConfig

    base = dict(data="d", out="o", init="m")
    with pytest.raises(ConfigError, match="add_mask_token"):
        TrainConfig(kind="lora", add_mask_token=True, **base)
    assert TrainConfig(kind="sdar", add_mask_token=True, **base).add_mask_token
    assert TrainConfig(kind="convert", **base).fingerprint() == TrainConfig(kind="convert", add_mask_token=False,
                                                                           **base).fingerprint()


def test_convert_with_the_original_as_clean_teacher_resumes_exactly_and_saves_no_teacher(no_mask_run, tmp_path,
                                                                                       monkeypatch):
    """clean_distill_weight: the frozen original (one row fewer than the model with its MASK row) is loaded
    from `init`, logged as l_clean_soft, left out of checkpoints and final weights (the same keys as a plain
    conversion), and a run crashed after a checkpoint resumes to the same weights; a config asking for it
    on another kind, or without an init, is refused by name."""
    from safetensors.torch import load_file

    from idlm.training.trainer import Trainer

    root, ckpt, vocab = no_mask_run
    Trainer(_cfg(root, ckpt, tmp_path / "plain")).train()
    Trainer(_cfg(root, ckpt, tmp_path / "a", clean_distill_weight=1.0)).train()
    t = Trainer(_cfg(root, ckpt, tmp_path / "b", clean_distill_weight=1.0))
    assert t.objective.teacher.config.vocab_size == vocab and t.model.config.vocab_size == vocab + 1
    assert not any(p is q for p in t.objective.parameters() for q in t.objective.teacher.parameters())
    crash_in_step(monkeypatch, t, 5)
    with pytest.raises(KeyboardInterrupt):
        t.train()
    monkeypatch.undo()
    Trainer(_cfg(root, ckpt, tmp_path / "b", clean_distill_weight=1.0)).train(resume=True)
    plain, a, b = (load_file(str(tmp_path / r / "final" / "model.safetensors")) for r in ("plain", "a", "b"))
    assert a.keys() == b.keys() == plain.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], plain[k]) for k in a)  # the soft clean targets changed the training
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all("l_clean_soft" in r for r in rows if "loss" in r)
    for bad in (dict(kind="sdar"), dict(init=None, model=dict(family="qwen3"))):
        with pytest.raises(ConfigError, match="clean_distill_weight"):
            _cfg(root, ckpt, tmp_path / "x", clean_distill_weight=1.0, **bad)
