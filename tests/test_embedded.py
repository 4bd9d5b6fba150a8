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
