"""Training runs end to end on CPU with a tiny model: loss falls, exact resume, all four kinds, and
bad input (config typo, resume from another config, a killed save, a missing shard) handled cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig

import pytest
import torch
import yaml
from tiny import crash_in_step

from idlm.errors import CheckpointError, ConfigError, IdlmError
from idlm.training.config import TrainConfig
from idlm.training.trainer import Trainer

MODEL = dict(family="qwen3", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from idlm.data.build import build_dataset
    stdlib = sysconfig.get_paths()["stdlib"]
    out = tmp_path_factory.mktemp("data") / "ds"
    build_dataset(str(out), roots=[os.path.join(stdlib, "json"), os.path.join(stdlib, "email")], vocab_size=400,
                  n_synthetic=200, n_eval=5, progress=False, workers=1, holdout_fraction=0.2)
    return str(out)


def cfg(data_dir, out, **kw) -> TrainConfig:
    base = dict(kind="pretrain", data=data_dir, out=str(out), model=MODEL, seq_len=32, batch_size=8, max_steps=12,
                lr=3e-3, log_every=1, eval_every=6, eval_batches=2, save_every=6, seed=0)
    base.update(kw)
    return TrainConfig.from_dict(base)


def weights(path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def pretrained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "run"
    Trainer(cfg(data_dir, out, max_steps=40, eval_every=20, save_every=20)).train()
    return out


def test_pretrain_loss_falls_and_writes_artifacts(pretrained):
    rows = [json.loads(x) for x in (pretrained / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert any("eval_clean" in r for r in rows) and all(r["tokens_per_s"] > 0 for r in rows if "loss" in r)
    assert (pretrained / "loss.png").stat().st_size > 1000
    from idlm.models.loader import load_pretrained
    model, tok = load_pretrained(pretrained / "final")
    assert model.config.mask_token_id == tok.mask_token_id == 3 and model.config.vocab_size == tok.vocab_size


def test_interrupted_then_resumed_run_ends_with_identical_weights(data_dir, tmp_path, monkeypatch):
    Trainer(cfg(data_dir, tmp_path / "a")).train()
    t = Trainer(cfg(data_dir, tmp_path / "b"))
    crash_in_step(monkeypatch, t, 9)  # after the checkpoint of step 6
    with pytest.raises(KeyboardInterrupt):
        t.train()
    monkeypatch.undo()
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text() == "step-0000006"
    Trainer(cfg(data_dir, tmp_path / "b")).train(resume=True)
    a, b = weights(tmp_path / "a" / "final"), weights(tmp_path / "b" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_paused_by_max_time_s_leaves_no_final_and_resumes_to_the_same_weights(data_dir, tmp_path):
    """max_time_s stops at a checkpoint (a pause, not the end): no final/ appears until the resumed run ends,
    and the resumed run ends with the weights of an uninterrupted one."""
    Trainer(cfg(data_dir, tmp_path / "a")).train()
    t = Trainer(cfg(data_dir, tmp_path / "b", max_time_s=0.0))
    last = t.train()
    assert last["stopped_early"] is True and last["step"] == 0
    assert not (tmp_path / "b" / "final").exists()
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text() == "step-0000000"
    done = Trainer(cfg(data_dir, tmp_path / "b")).train(resume=True)
    assert "stopped_early" not in done and done["step"] == 12
    a, b = weights(tmp_path / "a" / "final"), weights(tmp_path / "b" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stop_at_step_pauses_at_that_step_and_the_resumed_curve_is_identical(data_dir, tmp_path):
    """stop_at_step (`idlm train --stop-at-step K`) pauses at step K between checkpoints (save_every 6, K = 5)
    with a checkpoint and no final/; the resumed run logs the same loss at every step as an uninterrupted one
    and ends with the same weights. A K outside 1..max_steps-1 is refused by name."""
    Trainer(cfg(data_dir, tmp_path / "a")).train()
    last = Trainer(cfg(data_dir, tmp_path / "b", stop_at_step=5)).train()
    assert last["stopped_early"] is True and last["step"] == 5 and not (tmp_path / "b" / "final").exists()
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text() == "step-0000005"
    Trainer(cfg(data_dir, tmp_path / "b")).train(resume=True)
    curves = []
    for r in "ab":
        rows = [json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
        curves.append({row["step"]: (row["loss"], row["grad_norm"]) for row in rows if "loss" in row})
    assert curves[0] == curves[1] and sorted(curves[0]) == list(range(1, 13))
    a, b = weights(tmp_path / "a" / "final"), weights(tmp_path / "b" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for bad in (0, 12, 2.5):
        with pytest.raises(ConfigError, match="stop_at_step"):
            cfg(data_dir, tmp_path / "c", stop_at_step=bad)


@pytest.mark.parametrize("kind", ["convert", "sdar", "lora"])
def test_diffusion_kinds_train_from_the_pretrained_model(kind, data_dir, pretrained, tmp_path):
    c = cfg(data_dir, tmp_path / kind, kind=kind, init=str(pretrained / "final"), model=None, max_steps=6,
            curriculum=[[0.5, 2], [1.0, 3]], lora_rank=4, lora_alpha=4)
    assert c.stride_at(0) == 2 and c.stride_at(5) == 3
    last = Trainer(c).train()
    assert torch.isfinite(torch.tensor(last["loss"]))
    rows = [json.loads(x) for x in (tmp_path / kind / "metrics.jsonl").read_text().splitlines()]
    assert [r["stride"] for r in rows if "loss" in r] == [2, 2, 2, 3, 3, 3]
    from idlm.decoding import make_decoder
    from idlm.decoding.reference import generate
    from idlm.decoding.sampling import SamplingParams
    from idlm.models.loader import load_pretrained
    if kind == "lora":
        from idlm.layers.lora import LoRAAdapter
        base, tok = load_pretrained(pretrained / "final")
        adapter = LoRAAdapter.load(tmp_path / kind / "final", base.config)
        sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        ar = generate(base, make_decoder("ar", 1, base.config), [[5, 6, 7]], sp)
        risd = generate(base, make_decoder("risd", 3, base.config, tok), [[5, 6, 7]], sp, lora=adapter)
        assert ar[0].token_ids == risd[0].token_ids
    else:
        model, tok = load_pretrained(tmp_path / kind / "final")
        out = generate(model, make_decoder("isd" if kind == "convert" else "sdar", 3, model.config, tok),
                       [[5, 6, 7]], SamplingParams(temperature=0, max_tokens=6))
        assert 1 <= len(out[0].token_ids) <= 6


def test_lora_continues_from_a_trained_adapter(data_dir, pretrained, tmp_path):
    """`init_adapter`: a LoRA run starts from a trained adapter's weights (more training for a shipped
    drafter), not a fresh init; another rank is refused with the field named; only kind lora takes it."""
    from idlm.layers.lora import LoRAAdapter
    from idlm.models.loader import load_pretrained

    first = cfg(data_dir, tmp_path / "a", kind="lora", init=str(pretrained / "final"), model=None, max_steps=6,
                curriculum=[[1.0, 3]], lora_rank=4, lora_alpha=4)
    Trainer(first).train()
    base, _ = load_pretrained(pretrained / "final")
    trained = LoRAAdapter.load(tmp_path / "a" / "final", base.config).state_dict()
    more = cfg(data_dir, tmp_path / "b", kind="lora", init=str(pretrained / "final"), model=None, max_steps=6,
               curriculum=[[1.0, 3]], lora_rank=4, lora_alpha=4, init_adapter=str(tmp_path / "a" / "final"))
    t = Trainer(more)
    start = t.adapter.state_dict()
    assert all(torch.equal(start[k].cpu(), trained[k]) for k in trained)  # the run starts where the other ended
    fresh = Trainer(cfg(data_dir, tmp_path / "c", kind="lora", init=str(pretrained / "final"), model=None,
                        max_steps=6, curriculum=[[1.0, 3]], lora_rank=4, lora_alpha=4)).adapter.state_dict()
    assert not all(torch.equal(fresh[k].cpu(), trained[k]) for k in trained)
    with pytest.raises(ConfigError, match="lora_rank"):
        Trainer(cfg(data_dir, tmp_path / "d", kind="lora", init=str(pretrained / "final"), model=None, max_steps=6,
                    lora_rank=8, lora_alpha=4, init_adapter=str(tmp_path / "a" / "final")))
    with pytest.raises(ConfigError, match="init_adapter"):
        cfg(data_dir, tmp_path / "e", kind="convert", init=str(pretrained / "final"), model=None,
            init_adapter=str(tmp_path / "a" / "final"))


def test_config_errors(data_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'lerning_rate' \(did you mean 'learning_rate'|unknown key"):
        TrainConfig.from_dict(dict(kind="pretrain", data=data_dir, out=str(tmp_path), model=MODEL, lerning_rate=1))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(dict(kind="pretrain", data=data_dir, out=str(tmp_path / "o"),
                                                         model=MODEL, max_step=3)))
    with pytest.raises(ConfigError, match=r"unknown key 'max_step' \(did you mean 'max_steps'\?\)"):
        TrainConfig.from_yaml(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="curriculum"):
        cfg(data_dir, tmp_path, curriculum=[[0.5, 2]])
    with pytest.raises(ConfigError, match="needs 'init'"):
        cfg(data_dir, tmp_path, kind="convert", model=None)
    for bad, match in (({"tv_weight": 1.5}, "tv_weight must be"), ({"tv_weight": True}, "tv_weight must be"),
                       ({"tv_temperature": 0}, "tv_temperature must be"), ({"tv_weight": 0.5}, "tv_weight is for")):
        with pytest.raises(ConfigError, match=match):
            cfg(data_dir, tmp_path, **bad)  # kind pretrain has no drafts


def test_tv_draft_loss_trains_logs_and_is_part_of_the_fingerprint(data_dir, pretrained, tmp_path):
    """A drafter trained with tv_weight (lora, at tv_temperature) logs `l_tv`, the drafts' rejection rate
    against the base model at that temperature, which falls; a run without it is another run."""
    kw = dict(kind="lora", init=str(pretrained / "final"), model=None, max_steps=16, curriculum=[[1.0, 3]],
              lora_rank=4, lora_alpha=8, lr=1e-2, save_every=8)
    run = cfg(data_dir, tmp_path / "tv", tv_weight=0.5, tv_temperature=0.7, **kw)
    Trainer(run).train()
    rows = [json.loads(x) for x in (tmp_path / "tv" / "metrics.jsonl").read_text().splitlines()]
    tv = [r["l_tv"] for r in rows if "l_tv" in r]
    assert len(tv) == 16 and all(0 < x < 1 for x in tv)
    held_out = [r["eval_tv"] for r in rows if "eval_tv" in r]  # eval_every 6: steps 6, 12 and the end
    assert len(held_out) >= 2 and all(0 < x < 1 for x in held_out)
    assert sum(tv[-4:]) / 4 < sum(tv[:4]) / 4
    assert run.fingerprint() != cfg(data_dir, tmp_path / "tv", **kw).fingerprint()
    assert cfg(data_dir, tmp_path / "x", **kw).fingerprint() == cfg(data_dir, tmp_path / "x", tv_weight=0,
                                                                  tv_temperature=1, **kw).fingerprint()


def test_resume_from_a_different_config_is_refused(data_dir, tmp_path):
    Trainer(cfg(data_dir, tmp_path / "r", max_steps=6)).train()
    with pytest.raises(CheckpointError, match="different config .*differs in: lr"):
        Trainer(cfg(data_dir, tmp_path / "r", max_steps=6, lr=1e-2)).train(resume=True)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        Trainer(cfg(data_dir, tmp_path / "r", max_steps=6)).train()


def test_killed_save_leaves_previous_checkpoint_intact(data_dir, tmp_path, monkeypatch):
    t = Trainer(cfg(data_dir, tmp_path / "k", max_steps=12, save_every=6))
    real = torch.save
    calls = {"n": 0}

    def disk_full(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint (step 12) fails mid-write
            raise OSError(28, "No space left on device")
        return real(*a, **k)
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        t.train()
    monkeypatch.undo()
    ck = tmp_path / "k" / "checkpoints"
    assert (ck / "latest").read_text() == "step-0000006"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step-0000006"]  # no half-written directory
    t2 = Trainer(cfg(data_dir, tmp_path / "k", max_steps=12, save_every=6))
    t2.load_checkpoint()
    assert t2.step == 6


def test_missing_or_corrupt_shard_is_a_clear_error(data_dir, tmp_path):
    import shutil
    bad = tmp_path / "ds"
    shutil.copytree(data_dir, bad)
    os.remove(bad / "train.tokens.bin")
    with pytest.raises(IdlmError, match="train.tokens.bin"):
        Trainer(cfg(str(bad), tmp_path / "o"))
    shutil.copy(os.path.join(data_dir, "train.tokens.bin"), bad / "train.tokens.bin")
    with open(bad / "train.tokens.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(IdlmError, match="train.tokens.bin"):
        Trainer(cfg(str(bad), tmp_path / "o"))


@pytest.mark.slow
def test_ddp_two_ranks_on_cpu_with_gloo(data_dir, tmp_path):
    c = cfg(data_dir, tmp_path / "ddp", max_steps=4, save_every=4, eval_every=4)
    path = tmp_path / "ddp.yaml"
    d = c.to_dict()
    path.write_text(yaml.safe_dump(d))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29533", "-m", "idlm.cli", "train", "pretrain", str(path)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # rank 0 alone logs
    results = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    assert len(results) == 1 and json.loads(results[0])["step"] == 4  # one result line, not one per rank
    assert (tmp_path / "ddp" / "final" / "model.safetensors").exists()
