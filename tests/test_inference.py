"""The one inference setup (`idlm.inference`): device/dtype defaults, the default decoder, and the R-ISD
adapter rules shared by idlm.LLM, idlm serve and the generate/eval/bench commands."""

from __future__ import annotations

import json

import pytest
import torch

from idlm.errors import CheckpointError, ConfigError
from idlm.inference import choose_decoder, load_for_inference
from idlm.layers.lora import LoRAAdapter, LoRAConfig
from idlm.models import registry
from idlm.models.config import ModelConfig
from idlm.models.random import SHAPES


def test_default_decoder_follows_the_model():
    tiny = load_for_inference("idlm-tiny", device="cpu")  # an I-DLM: ISD
    assert tiny.decoder == "isd" and tiny.adapter is None and tiny.dtype == torch.float32
    ar = load_for_inference("idlm-tiny-ar", device="cpu")  # an AR model with a known adapter: lossless R-ISD
    assert ar.decoder == "risd" and ar.adapter_name == "idlm-tiny-ar-risd-lora" and ar.adapter is not None
    assert load_for_inference("idlm-tiny-ar", decoder="ar", device="cpu").adapter is None


def test_risd_adapter_rules(tmp_path):
    cfg = ModelConfig.from_hf(SHAPES["smollm2-135m"])
    if registry.risd_adapter("smollm2-135m-instruct") is None:  # until the trained adapter is embedded
        with pytest.raises(ConfigError, match="needs a gated LoRA adapter and none is known for 'smollm2"):
            choose_decoder("risd", "smollm2-135m-instruct", cfg, None, None)
        assert choose_decoder(None, "smollm2-135m-instruct", cfg, None, None) == ("ar", None)
    else:
        assert choose_decoder(None, "smollm2-135m-instruct", cfg, None, None)[0] == "risd"
    assert choose_decoder("risd", "x", cfg, None, "some/path") == ("risd", "some/path")
    assert choose_decoder(None, "x", cfg, None, "some/path") == ("risd", "some/path")
    with pytest.raises(ConfigError, match="only used by the risd decoder"):
        choose_decoder("ar", "x", cfg, None, "some/path")
    with pytest.raises(ConfigError, match="unknown decoder"):
        choose_decoder("beam", "x", cfg, None, None)


def test_an_adapter_for_another_base_or_without_mask_embedding_is_refused(tmp_path):
    from idlm.models.loader import load_pretrained

    model, _ = load_pretrained("idlm-tiny-ar")
    wrong_vocab = ModelConfig(**{**model.config.__dict__, "vocab_size": model.config.vocab_size + 1})
    LoRAAdapter(wrong_vocab, LoRAConfig(rank=4)).init_weights(seed=0).save(tmp_path / "vocab")
    with pytest.raises(CheckpointError, match="vocab_size"):
        load_for_inference("idlm-tiny-ar", decoder="risd", lora=str(tmp_path / "vocab"), device="cpu")
    small = ModelConfig(**{**model.config.__dict__, "hidden_size": 64, "head_dim": 16})
    LoRAAdapter(small, LoRAConfig(rank=4)).init_weights(seed=0).save(tmp_path / "shape")
    with pytest.raises(CheckpointError, match="has shape .* but the model needs"):
        load_for_inference("idlm-tiny-ar", decoder="risd", lora=str(tmp_path / "shape"), device="cpu")
    # an adapter file without its MASK embedding
    from safetensors.torch import load_file, save_file

    good = tmp_path / "nomask"
    LoRAAdapter(model.config, LoRAConfig(rank=4)).init_weights(seed=0).save(good)
    tensors = load_file(str(good / "adapter_model.safetensors"))
    del tensors["mask_embedding"]
    save_file(tensors, str(good / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor 'mask_embedding'"):
        load_for_inference("idlm-tiny-ar", decoder="risd", lora=str(good), device="cpu")
    meta = json.loads((good / "adapter_config.json").read_text())
    assert meta["idlm_base"]["vocab_size"] == model.config.vocab_size


def test_generate_picks_the_known_adapter(capsys):
    from idlm.cli import main

    base = ["generate", "def add(a, b):", "--model", "idlm-tiny-ar", "--max-tokens", "12", "--json"]
    assert main(base) == 0
    ar = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*base, "--decoder", "risd"]) == 0  # no --lora: idlm-tiny-ar-risd-lora
    risd = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert risd["token_ids"] == ar["token_ids"] and risd["stats"]["decoder"] == "risd"
    assert main(["generate", "hi", "--decoder", "risd"]) == 2  # idlm-tiny has no known adapter
    assert "none is known for 'idlm-tiny'" in capsys.readouterr().err


def test_every_entry_point_encodes_a_prompt_the_same_way(tmp_path, capsys):
    """A tokenizer that adds a BOS: `idlm generate`, `idlm.LLM` and `/v1/completions` (and /tokenize) all run
    the same token ids for the same text (`Tokenizer.encode_prompt`, the one prompt encoding)."""
    from fastapi.testclient import TestClient
    from tiny import write_tiny_checkpoint

    from idlm.cli import main
    from idlm.decoding.sampling import SamplingParams
    from idlm.engine.async_engine import AsyncLLM
    from idlm.engine.llm import LLM
    from idlm.models.loader import load_pretrained
    from idlm.server.app import build_app

    ckpt = write_tiny_checkpoint(tmp_path / "bos", tokenizer_config={"bos_token": "<|im_start|>",
                                                                       "add_bos_token": True})
    _, tok = load_pretrained(ckpt)
    text = "hello world"
    want = tok.encode(text, add_special_tokens=True)
    assert want[0] == tok.bos_token_id and want[1:] == tok.encode(text)
    assert main(["generate", text, "--model", str(ckpt), "--max-tokens", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["prompt_token_ids"] == want
    llm = LLM(str(ckpt), decoder="ar", device="cpu", num_pages=32)
    assert llm.generate(text, SamplingParams(max_tokens=2))[0].prompt_token_ids == want
    async_llm = AsyncLLM(llm.engine)
    with TestClient(build_app(async_llm, "bos")) as c:
        r = c.post("/v1/completions", json={"prompt": text, "max_tokens": 1, "echo": True, "logprobs": 0,
                                            "temperature": 0}).json()
        assert r["usage"]["prompt_tokens"] == len(want)
        assert len(r["choices"][0]["logprobs"]["tokens"]) == len(want) + 1
        assert c.post("/tokenize", json={"prompt": text}).json()["tokens"] == want
    async_llm.close(5)
