"""The `idlm` command line: generate on a tiny checkpoint, JSON output, and clean errors (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tiny import write_tiny_checkpoint

from idlm.cli import main
from idlm.decoding.ar import generate_ar
from idlm.decoding.sampling import SamplingParams
from idlm.models.loader import load_pretrained


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("cli") / "tiny")


@pytest.fixture(scope="module")
def ckpt_no_mask(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("cli") / "nomask", mask=False)


def run_json(capsys, *argv) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_generate_json_greedy_equals_library(ckpt, capsys):
    out = run_json(capsys, "generate", "hello world", "--model", str(ckpt), "--max-tokens", "12", "--json")
    model, tok = load_pretrained(ckpt)
    ref = generate_ar(model, [tok.encode("hello world")], SamplingParams(temperature=0, max_tokens=12),
                      eos_token_ids=sorted(tok.eos_token_ids))[0]
    assert out["token_ids"] == ref.token_ids
    assert out["text"] == tok.decode(ref.token_ids, skip_special_tokens=True)
    assert out["stats"]["generated_tokens"] == len(out["token_ids"]) <= 12
    assert out["finish_reason"] in ("stop", "length")


def test_generate_chat_and_seeded_sampling(ckpt, capsys):
    args = ["generate", "hello", "--chat", "--model", str(ckpt), "--max-tokens", "10", "--json",
            "--temperature", "1.0", "--top-k", "50", "--top-p", "0.9", "--seed", "7"]
    a, b = run_json(capsys, *args), run_json(capsys, *args)
    assert a["token_ids"] == b["token_ids"]  # same seed, same output
    _, tok = load_pretrained(ckpt)
    assert a["prompt_token_ids"] == tok.encode_chat([{"role": "user", "content": "hello"}])
    outs = {tuple(run_json(capsys, *args[:-1], str(s))["token_ids"]) for s in range(5)}
    assert len(outs) > 1  # different seeds differ


def test_streaming_text_output(ckpt, capsys):
    assert main(["generate", "hello", "--model", str(ckpt), "--max-tokens", "8"]) == 0
    out = run_json(capsys, "generate", "hello", "--model", str(ckpt), "--max-tokens", "8", "--json")
    main(["generate", "hello", "--model", str(ckpt), "--max-tokens", "8"])
    assert capsys.readouterr().out == out["text"] + "\n"


@pytest.mark.parametrize("argv, message", [
    (["--model", "/no/such/model"], "model not found: /no/such/model"),
    (["--temperature", "-1"], "temperature=-1.0: must be >= 0"),
    (["--top-p", "0"], "top_p=0.0: must be in (0, 1]"),
    (["--top-p", "1.5"], "top_p=1.5: must be in (0, 1]"),
    (["--top-k", "-3"], "top_k=-3: must be an integer >= 0"),
    (["--max-tokens", "0"], "max_tokens=0: must be an integer >= 1"),
    (["--max-tokens", "1000"], "exceeds the model's context of 128 tokens"),
    (["--dtype", "float32", "--device", "cuda:0"], "CUDA is not available"),
])
def test_bad_input_is_one_clear_error(ckpt, capsys, argv, message):
    if "cuda" in " ".join(argv) and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    if "--model" not in argv:
        argv = ["--model", str(ckpt), *argv]
    assert main(["generate", "hi", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_diffusion_decoder_on_model_without_mask_token(ckpt_no_mask, capsys):
    assert main(["generate", "hi", "--model", str(ckpt_no_mask), "--decoder", "isd"]) == 2
    err = capsys.readouterr().err
    assert "decoder 'isd' needs a MASK token, but this model has none" in err


def test_entry_point_runs_as_a_program(ckpt):
    proc = subprocess.run([sys.executable, "-m", "idlm.cli", "generate", "hi", "--model", str(ckpt),
                           "--max-tokens", "4", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "token_ids" in json.loads(proc.stdout.strip().splitlines()[-1])
    proc = subprocess.run([sys.executable, "-m", "idlm.cli", "generate", "hi", "--model", "/nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: model not found")


def test_generate_with_diffusion_decoders_reports_stats(ckpt, tmp_path, capsys):
    from idlm.layers.lora import LoRAAdapter, LoRAConfig
    base = ["generate", "hello world", "--model", str(ckpt), "--max-tokens", "24", "--json"]
    ar = run_json(capsys, *base)
    isd = run_json(capsys, *base, "--decoder", "isd", "--stride", "4", "--draft", "argmax")
    assert isd["token_ids"] == ar["token_ids"]  # greedy ISD = greedy AR
    s = isd["stats"]
    assert s["decoder"] == "isd" and s["stride"] == 4 and len(s["accepted_per_position"]) == 3
    assert s["tpf"] == pytest.approx(s["committed"] / s["forwards"], abs=1e-4)
    assert set(s["rounds"]) == {"verify_accepted", "verify_rejected", "cold"}
    model, _ = load_pretrained(ckpt)
    adapter = LoRAAdapter(model.config, LoRAConfig(rank=4, alpha=8)).init_weights(std=0.3, seed=1, zero_b=False)
    adapter.save(tmp_path / "lora")
    risd = run_json(capsys, *base, "--decoder", "risd", "--stride", "3", "--lora", str(tmp_path / "lora"))
    assert risd["token_ids"] == ar["token_ids"]  # R-ISD is lossless
    assert main([*base, "--decoder", "risd"]) == 2
    assert "needs a gated LoRA adapter and none is known" in capsys.readouterr().err
    assert main([*base, "--decoder", "isd", "--stride", "1"]) == 2
    assert "ISD needs N >= 2" in capsys.readouterr().err


def test_generate_exact_equals_reference_and_needs_triton(ckpt, tmp_path, capsys, monkeypatch):
    """`idlm generate --exact` runs the request through an exact-mode engine: the same greedy tokens as the
    reference decoders; without the Triton kernels (CPU, no interpreter), or for a head dim the exact
    attention kernel cannot take, one clear error."""
    pytest.importorskip("triton", reason="exact mode's kernels are Triton kernels")
    hd16 = write_tiny_checkpoint(tmp_path / "hd16", head_dim=16)
    base = ["generate", "hello world", "--model", str(hd16), "--max-tokens", "6", "--json"]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        assert main([*base, "--exact"]) == 2
        assert "exact mode needs the Triton kernels" in capsys.readouterr().err
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["generate", "hi", "--model", str(ckpt), "--exact"]) == 2  # the fixture's head dim is 8
    assert "power of two >= 16; this model's is 8" in capsys.readouterr().err
    ref = run_json(capsys, *base, "--decoder", "isd", "--stride", "2")
    exact = run_json(capsys, *base, "--decoder", "isd", "--stride", "2", "--exact")
    assert exact["token_ids"] == ref["token_ids"] and exact["finish_reason"] == ref["finish_reason"]
