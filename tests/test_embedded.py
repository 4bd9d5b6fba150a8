"""The embedded trained models: present, small enough, the CLI default, and decoding them is exact."""

from __future__ import annotations

import json

from idlm.cli import main
from idlm.decoding import make_decoder
from idlm.decoding.reference import generate
from idlm.decoding.sampling import SamplingParams
from idlm.layers.lora import LoRAAdapter
from idlm.models import registry
from idlm.models.loader import load_pretrained


def test_assets_exist_with_model_cards_and_fit_the_budget():
    total = 0
    for name in registry.embedded():
        path = registry.fetch(name)
        assert (path / "README.md").exists()
        total += sum(f.stat().st_size for f in path.iterdir())
    assert total <= 80 * 1024 * 1024


def test_idlm_tiny_is_the_cli_default(capsys):
    assert main(["generate", "def add(a, b):", "--max-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    _, tok = load_pretrained("idlm-tiny")
    assert out["prompt_token_ids"] == tok.encode("def add(a, b):")


def test_greedy_isd_of_idlm_tiny_equals_its_greedy_ar(tiny):
    model, tok = tiny
    prompts = [tok.encode("def fibonacci(n):"), tok.encode_chat([{"role": "user", "content": "What is 17 + 25?"}])]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ar = generate(model, make_decoder("ar", 1, model.config), prompts, sp)
    isd = generate(model, make_decoder("isd", 4, model.config, tok), prompts, sp)
    assert [o.token_ids for o in isd] == [o.token_ids for o in ar]
    assert sum(o.stats.committed for o in isd) / sum(o.stats.forwards for o in isd) > 1.3  # trained drafter


def test_embedded_risd_lora_is_lossless():
    base, tok = load_pretrained("idlm-tiny-ar")
    adapter = LoRAAdapter.load(registry.fetch("idlm-tiny-ar-risd-lora"), base.config)
    prompts = [tok.encode("import os\n"), tok.encode_chat([{"role": "user", "content": "Reverse: a b c"}])]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ar = generate(base, make_decoder("ar", 1, base.config), prompts, sp)
    risd = generate(base, make_decoder("risd", 4, base.config, tok), prompts, sp, lora=adapter)
    assert [o.token_ids for o in risd] == [o.token_ids for o in ar]


def test_embedded_smollm2_adapter_fits_smollm2_and_is_lossless():
    """The trained SmolLM2-135M-Instruct adapter (issue 12) loads onto SmolLM2's shape (every LoRA pair and
    the MASK embedding the right size) and keeps R-ISD exact. The GGUF is not fetched here: a random model of
    the same shape stands in (R-ISD's exactness does not depend on the base weights), fp32, 16 tokens."""
    import torch

    from idlm.models.random import random_model

    assert registry.risd_adapter("smollm2-135m-instruct") == "smollm2-135m-instruct-risd-lora"
    base = random_model("smollm2-135m", dtype="float32", std=0.05)
    adapter = LoRAAdapter.load(registry.fetch("smollm2-135m-instruct-risd-lora"), base.config)
    assert adapter.mask_embedding.shape == (base.config.hidden_size,)
    assert all(float(p.detach().abs().sum()) > 0 for p in adapter.parameters())  # trained, not a zero init
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, base.config.vocab_size, (n,), generator=g).tolist() for n in (5, 11)]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    ar = generate(base, make_decoder("ar", 1, base.config), prompts, sp)
    risd = generate(base, make_decoder("risd", 4, base.config), prompts, sp, lora=adapter)
    assert [o.token_ids for o in risd] == [o.token_ids for o in ar]
    # the engine's fused step on this shape (no q/k norms, tied embeddings), both layouts, with branches
    from idlm.engine.llm_engine import EngineConfig, LLMEngine

    for layout in ("pair", "select", "lowrank"):
        model = random_model("smollm2-135m", dtype="float32", std=0.05)
        eng = LLMEngine(model, None, EngineConfig(decoder="risd", stride=4, max_num_seqs=2, num_pages=64,
                                                  fuse_projections=True, lora_layout=layout, branches=True),
                        lora=adapter)
        assert model.model.layers[0].self_attn.qkv_lora is not None
        assert [o.token_ids for o in eng.run(prompts, sp)] == [o.token_ids for o in ar], layout
