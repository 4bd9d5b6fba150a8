"""Model numerics against HF transformers (the oracle), checkpoint round trips and loader errors."""

from __future__ import annotations

import json

import pytest
import torch

from idlm.errors import CheckpointError, ConfigError
from idlm.layers.attention import KVCache
from idlm.models.config import ModelConfig
from idlm.models.loader import load_model, save_pretrained
from idlm.models.transformer import Transformer

transformers = pytest.importorskip("transformers")

TOL = 1e-5
BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=256)
# family -> list of (case name, extra HF config kwargs)
CASES = {
    "qwen3-gqa-untied": ("Qwen3", dict(num_key_value_heads=2, head_dim=16, rope_theta=5000.0,
                                       tie_word_embeddings=False)),
    "qwen3-mha-tied-bias": ("Qwen3", dict(num_key_value_heads=4, head_dim=8, tie_word_embeddings=True,
                                          attention_bias=True)),
    "qwen2-gqa-tied": ("Qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6)),
    "qwen2-gqa-untied": ("Qwen2", dict(num_key_value_heads=1, tie_word_embeddings=False)),
    "llama-gqa-untied": ("Llama", dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
                                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama-mha-tied-bias": ("Llama", dict(num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True,
                                          mlp_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0})),
}


def hf_model(case: str, seed: int = 0):
    prefix, extra = CASES[case]
    cfg = getattr(transformers, f"{prefix}Config")(**BASE, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForCausalLM")(cfg).eval()
    with torch.no_grad():  # HF zero-inits biases and unit-inits norms: randomise them so they are tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(HF model, our model loaded from the HF checkpoint on disk, checkpoint dir)."""
    hf = hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, load_model(path), path


def mixed_batch(vocab: int, lengths=(7, 13, 3, 10), seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def right_pad(seqs: list[torch.Tensor]) -> torch.Tensor:
    out = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)
    for b, s in enumerate(seqs):
        out[b, : len(s)] = s
    return out


@torch.no_grad()
def test_full_forward_matches_hf_on_padded_batch(pair):
    hf, ours, _ = pair
    seqs = mixed_batch(hf.config.vocab_size)
    # ours: one right-padded batch (padding only trails, causal attention never sees it)
    logits = ours.logits(right_pad(seqs))
    # oracle 1: HF on each sequence alone
    for b, s in enumerate(seqs):
        ref = hf(s[None]).logits[0]
        assert (logits[b, : len(s)] - ref).abs().max().item() <= TOL
    # oracle 2: HF on a left-padded batch with an attention mask and explicit positions
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):], mask[b, T - len(s):] = s, 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = hf(ids, attention_mask=mask, position_ids=pos).logits
    for b, s in enumerate(seqs):
        assert (logits[b, : len(s)] - ref[b, T - len(s):]).abs().max().item() <= TOL


@torch.no_grad()
def test_incremental_decoding_through_kv_cache_equals_full_forward(pair):
    hf, ours, _ = pair
    seqs = mixed_batch(hf.config.vocab_size, lengths=(9, 12, 5))
    full = ours.logits(right_pad(seqs))
    cfg, B = ours.config, len(seqs)
    cache = KVCache.for_model(cfg, B, max_len=16)
    prefill = [4, 7, 1]  # different prefill lengths per row, then one token at a time
    ids = right_pad([s[:n] for s, n in zip(seqs, prefill)])
    h = ours(ids, torch.arange(ids.shape[1]).expand(B, -1), cache.view(starts=torch.zeros(B, dtype=torch.long)))
    got = [[ours.compute_logits(h[b, i]) for i in range(n)] for b, n in enumerate(prefill)]
    cache.lengths[:] = torch.tensor(prefill)
    while True:
        rows = [b for b in range(B) if int(cache.lengths[b]) < len(seqs[b])]
        if not rows:
            break
        r = torch.tensor(rows)
        tok = torch.stack([seqs[b][int(cache.lengths[b])] for b in rows])[:, None]
        h = ours(tok, cache.lengths[r][:, None], cache.view(r))
        cache.lengths[r] += 1
        for i, b in enumerate(rows):
            got[b].append(ours.compute_logits(h[i, 0]))
    for b, s in enumerate(seqs):
        assert (torch.stack(got[b]) - full[b, : len(s)]).abs().max().item() <= TOL


@torch.no_grad()
def test_multi_token_blocks_and_rollback_through_kv_cache(pair):
    """A block of several query tokens after a cached prefix (the ISD shape) equals the full forward,
    and shrinking `lengths` discards the block's KV as if it had never been written."""
    _, ours, _ = pair
    seq = mixed_batch(ours.config.vocab_size, lengths=(14,))[0]
    full = ours.logits(seq[None])[0]
    cache = KVCache.for_model(ours.config, 1, max_len=32)
    h = ours(seq[None, :6], torch.arange(6)[None], cache.view())
    cache.lengths += 6
    junk = torch.randint(0, ours.config.vocab_size, (1, 7))
    ours(junk, torch.arange(6, 13)[None], cache.view())  # written, then rolled back (lengths unchanged)
    h = ours(seq[None, 6:], torch.arange(6, 14)[None], cache.view())
    assert (ours.compute_logits(h[0]) - full[6:]).abs().max().item() <= TOL


@torch.no_grad()
def test_round_trip_save_load_and_transformers_loads_ours(pair, tmp_path):
    hf, ours, _ = pair
    ids = torch.randint(0, hf.config.vocab_size, (2, 11))
    ref = ours.logits(ids)
    save_pretrained(ours, tmp_path / "ckpt")
    assert torch.equal(load_model(tmp_path / "ckpt").logits(ids), ref)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    assert torch.equal(back(ids).logits, ref)


@torch.no_grad()
def test_sharded_checkpoint_round_trip(tmp_path):
    model = Transformer(ModelConfig.from_hf(hf_model("qwen3-gqa-untied").config.to_dict())).init_weights(seed=3)
    save_pretrained(model, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ids = torch.randint(0, 97, (1, 9))
    assert torch.equal(load_model(tmp_path / "sharded").logits(ids), model.logits(ids))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.float32).eval()
    assert torch.equal(back(ids).logits, model.logits(ids))


@torch.no_grad()
def test_bf16_load_and_forward(pair):
    _, _, path = pair
    m = load_model(path, dtype="bfloat16")
    assert m.dtype == torch.bfloat16
    logits = m.logits(torch.randint(0, 97, (1, 5)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_sdar_config_maps_onto_qwen3_and_keeps_mask_token():
    hf = hf_model("qwen3-gqa-untied").config.to_dict()
    hf.update(model_type="sdar", architectures=["SDARForCausalLM"], mask_token_id=96, block_size=4,
              auto_map={"AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"}, fuse_cross_entropy=True)
    cfg = ModelConfig.from_hf(hf)
    assert (cfg.family, cfg.qk_norm, cfg.mask_token_id, cfg.block_size) == ("qwen3", True, 96, 4)
    out = cfg.to_hf()
    assert out["model_type"] == "qwen3" and out["mask_token_id"] == 96 and out["block_size"] == 4


def test_idlm_8b_shape_from_spec():
    """SPEC §8: I-DLM-8B is Qwen3-8B-shaped (36 layers, 4096 hidden, 32/8 heads, 128 head dim)."""
    cfg = ModelConfig.from_hf(dict(model_type="sdar", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                                   num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                                   head_dim=128, tie_word_embeddings=False, mask_token_id=151669,
                                   rope_theta=1e6, max_position_embeddings=40960))
    assert 8.1e9 < cfg.num_parameters < 8.3e9
    with torch.device("meta"):
        m = Transformer(cfg)
    assert sum(p.numel() for p in m.parameters()) == cfg.num_parameters


# ------------------------------------------------------------------------------- bad input
def _tiny_ckpt(tmp_path):
    hf = hf_model("qwen3-gqa-untied")
    hf.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_missing_path_and_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="model not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path / "empty")
    path = _tiny_ckpt(tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(path)


def test_unknown_architecture(tmp_path):
    path = _tiny_ckpt(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unknown architecture: model_type 'gpt_neox'"):
        load_model(path)


def test_corrupt_files(tmp_path):
    path = _tiny_ckpt(tmp_path)
    (path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors"):
        load_model(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_model(path)


def _rewrite_tensors(path, edit):
    from safetensors.torch import load_file, save_file
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path):
    path = _tiny_ckpt(tmp_path)
    _rewrite_tensors(path, lambda t: t.__setitem__("model.layers.1.mlp.up_proj.weight", torch.zeros(65, 32)))
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.up_proj.weight' has shape \(65, 32\) "
                                              r"but the model expects \(64, 32\)"):
        load_model(path)


def test_missing_and_unexpected_tensor(tmp_path):
    path = _tiny_ckpt(tmp_path)
    _rewrite_tensors(path, lambda t: t.pop("model.layers.0.self_attn.k_norm.weight"))
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.0.self_attn.k_norm.weight'"):
        load_model(path)
    path = _tiny_ckpt(tmp_path / "b")
    _rewrite_tensors(path, lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.extra.weight'"):
        load_model(path)


def test_bad_config_values(tmp_path):
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        ModelConfig.from_hf(dict(model_type="llama", vocab_size=10, hidden_size=12, intermediate_size=8,
                                 num_hidden_layers=1, num_attention_heads=3, num_key_value_heads=2))
    with pytest.raises(ConfigError, match="lacks the required field 'num_attention_heads'"):
        ModelConfig.from_hf(dict(model_type="llama", hidden_size=12))
    with pytest.raises(ConfigError, match="unsupported rope_scaling type 'yarn'"):
        ModelConfig.from_hf(dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=8,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(CheckpointError, match="unknown dtype 'fp8'"):
        load_model(_tiny_ckpt(tmp_path), dtype="fp8")


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = Transformer(ModelConfig.from_hf(hf_model("qwen3-gqa-untied").config.to_dict())).init_weights(seed=0)
    save_pretrained(model, tmp_path / "ckpt")
    ids = torch.randint(0, 97, (1, 6))
    before = load_model(tmp_path / "ckpt").logits(ids)
    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError("No space left on device")
    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError):
        save_pretrained(model.init_weights(seed=1), tmp_path / "ckpt")
    assert torch.equal(load_model(tmp_path / "ckpt").logits(ids), before)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dirs left behind


def test_fused_projections_match_separate_ones():
    """fuse_projections (one q/k/v and one gate/up matmul) computes the same logits; LoRA forwards and
    enable=False go back to the separate projections."""
    from tiny import tiny_transformer

    model = tiny_transformer(64)
    ids = torch.randint(0, 64, (2, 9))
    want = model.logits(ids)
    model.fuse_projections()
    assert model.model.layers[0].self_attn.qkv is not None
    torch.testing.assert_close(model.logits(ids), want, rtol=1e-5, atol=1e-5)
    assert set(model.state_dict()) == set(tiny_transformer(64).state_dict())  # names unchanged
    # no copy kept: the parameters are row slices of the fused weights, so each weight is stored once
    a, m = model.model.layers[0].self_attn, model.model.layers[0].mlp
    fused_qkv, fused_gu = a.qkv[0], m.gate_up[0]
    assert a.q_proj.weight.data_ptr() == fused_qkv.data_ptr()
    assert a.v_proj.weight.untyped_storage().data_ptr() == fused_qkv.untyped_storage().data_ptr()
    assert m.up_proj.weight.untyped_storage().data_ptr() == fused_gu.untyped_storage().data_ptr()
    torch.testing.assert_close(model.logits(ids), want, rtol=1e-5, atol=1e-5)  # separate path: same values
    model.fuse_projections()  # idempotent: the same fused tensors (graphs captured on them stay valid)
    assert a.qkv[0] is fused_qkv
    model.fuse_projections(False)
    assert model.model.layers[0].mlp.gate_up is None
    assert a.q_proj.weight.untyped_storage().data_ptr() != a.k_proj.weight.untyped_storage().data_ptr()
    torch.testing.assert_close(model.logits(ids), want, rtol=0, atol=0)


def test_save_pretrained_of_a_fused_model(tmp_path):
    """A fused model (parameters sharing the fused weights' storage) saves as the same checkpoint as the
    unfused one (safetensors before 0.8 refuses tensors that share memory: the saver copies the views)."""
    from tiny import tiny_transformer

    from idlm.models.loader import load_pretrained, save_pretrained

    model = tiny_transformer(64)
    ids = torch.randint(0, 64, (2, 9))
    want = model.logits(ids)
    save_pretrained(model.fuse_projections(), tmp_path / "fused")
    back, _ = load_pretrained(str(tmp_path / "fused"), with_tokenizer=False)
    torch.testing.assert_close(back.logits(ids), want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_qk_norm_and_rotary_equal_the_separate_functions(dtype):
    """`qk_norm_rotary` / `rotary_qk` (one compiled function per layer on CUDA) compute what the separate
    norms and `apply_rotary` calls did, bit for bit on CPU (eager), on the strided q/k views of a fused qkv."""
    from idlm.layers.norm import rms_norm
    from idlm.layers.rotary import RotaryEmbedding, apply_rotary, qk_norm_rotary, rotary_qk

    g = torch.Generator().manual_seed(0)
    B, T, hq, hkv, d = 2, 5, 6, 2, 16
    qkv = torch.randn(B, T, (hq + 2 * hkv) * d, generator=g).to(dtype)
    q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], -1)
    q, k = q.view(B, T, hq, d), k.view(B, T, hkv, d)  # non-contiguous, as in the attention layer
    cos, sin = RotaryEmbedding(d, 10000.0)(torch.arange(B * T).view(B, T), dtype)
    qw, kw = torch.rand(d, generator=g).to(dtype), torch.rand(d, generator=g).to(dtype)
    q2, k2 = qk_norm_rotary(q, k, qw, kw, 1e-6, cos, sin)
    assert torch.equal(q2, apply_rotary(rms_norm(q, qw, 1e-6), cos, sin))
    assert torch.equal(k2, apply_rotary(rms_norm(k, kw, 1e-6), cos, sin))
    q3, k3 = rotary_qk(q, k, cos, sin)
    assert torch.equal(q3, apply_rotary(q, cos, sin)) and torch.equal(k3, apply_rotary(k, cos, sin))
    assert q2.dtype == k3.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norms", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_rotary_qkv_writes_q_k_v_as_the_separate_functions(dtype, norms, gated):
    """`rotary_qkv` (the fused q/k/v matmul's output -> one tensor of q and k normed and RoPE'd and v, split into
    views by `split_qkv`) equals the separate `select_half`, norms and `apply_rotary`, bit for bit on CPU, with
    and without Qwen3's q/k norms and the "select" layout's per-row half; the views have the shapes the
    attention takes and share one storage."""
    from idlm.layers.lora import select_half
    from idlm.layers.norm import rms_norm
    from idlm.layers.rotary import RotaryEmbedding, apply_rotary, rotary_qkv, split_qkv

    g = torch.Generator().manual_seed(1)
    B, T, hq, hkv, d = 2, 5, 6, 2, 16
    width = (hq + 2 * hkv) * d
    out = torch.randn(B, T, 2 * width if gated else width, generator=g).to(dtype)
    gate = (torch.rand(B, T, generator=g) > 0.5).to(dtype) if gated else None
    cos, sin = RotaryEmbedding(d, 10000.0)(torch.arange(B * T).view(B, T), dtype)
    qw, kw = (torch.rand(d, generator=g).to(dtype), torch.rand(d, generator=g).to(dtype)) if norms else (None, None)
    q, k, v = split_qkv(rotary_qkv(out, gate, cos, sin, hq, hkv, qw, kw, 1e-6), hq, hkv)
    rows = select_half(out, gate) if gated else out
    q0, k0, v0 = rows.split([hq * d, hkv * d, hkv * d], -1)
    q0, k0, v0 = q0.view(B, T, hq, d), k0.view(B, T, hkv, d), v0.view(B, T, hkv, d)
    if norms:
        q0, k0 = rms_norm(q0, qw, 1e-6), rms_norm(k0, kw, 1e-6)
    assert torch.equal(q, apply_rotary(q0, cos, sin)) and torch.equal(k, apply_rotary(k0, cos, sin))
    assert torch.equal(v, v0)
    assert (q.shape, k.shape, v.shape) == ((B, T, hq, d), (B, T, hkv, d), (B, T, hkv, d))
    assert q.dtype == v.dtype == dtype and q.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    if gated:  # rows with gate 0 read exactly the base half
        base = out[..., :width][gate == 0][..., hq * d + hkv * d:]
        assert torch.equal(v[gate == 0].reshape(base.shape), base)
