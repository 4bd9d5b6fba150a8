"""The introspective acceptance rate α (SPEC §7) and the `idlm eval alpha` command."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_transformer, write_tiny_checkpoint

from idlm.cli import main
from idlm.decoding.ar import ARDecoder
from idlm.decoding.isd import ISDDecoder
from idlm.decoding.sampling import SamplingParams
from idlm.eval.alpha import clean_scores, introspective_alpha, masked_scores


@pytest.fixture(scope="module")
def model():
    return tiny_transformer(32, std=0.5, mask_token_id=31)


PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]


def test_ar_alpha_is_one_to_rounding(model):
    torch.manual_seed(0)
    res = introspective_alpha(model, ARDecoder(), PROMPTS, SamplingParams(temperature=1.0, max_tokens=30,
                                                                          ignore_eos=True))
    assert res["tokens"] == 90
    assert res["alpha"] == pytest.approx(1.0, abs=1e-5)
    assert res["alpha"] <= 1.0


def test_mismatched_drafter_has_alpha_below_one(model):
    """An untrained MASK drafter proposes from q̃ ≠ p̃: the accepted drafts lower α."""
    torch.manual_seed(0)
    res = introspective_alpha(model, ISDDecoder(4, 31), PROMPTS * 4,
                              SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True))
    assert res["stats"]["acceptance"] > 0.05  # some drafts were accepted (else α would be 1 trivially)
    assert res["alpha"] < 0.98


def test_isd_token_probs_are_the_generating_distributions(model):
    """Clean tokens (t0, c, corrections excluded) carry p̃ exactly: for greedy decoding every q is 1."""
    from idlm.decoding.reference import generate
    outs = generate(model, ISDDecoder(3, 31), PROMPTS, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        p = clean_scores(model, prompt, out.token_ids, SamplingParams(temperature=0))
        assert p == [1.0] * len(out.token_ids)  # greedy ISD = greedy AR: clean scoring agrees everywhere
        assert len(out.token_probs) == len(out.token_ids)


@pytest.mark.parametrize("rows", [1, 3, 64])
def test_sdar_masked_scores_are_one_forward_per_token(model, rows):
    """SDAR scoring in chunks of `rows` (the LM head only at each MASK) equals the oracle: for each k its own
    forward over prefix x_<k + MASK, p̃ read at the MASK."""
    prompt, tokens = [3, 9, 4], [7, 1, 30, 12, 5, 5, 8]
    params = SamplingParams(temperature=0.8, top_k=20)
    got = masked_scores(model, prompt, tokens, params, 31, rows_per_forward=rows)
    from idlm.decoding.sampling import filtered_probs, params_tensors
    want = []
    for k, x in enumerate(tokens):
        logits = model.logits(torch.tensor([prompt + tokens[:k] + [31]]))[0, -1:]
        want.append(filtered_probs(logits, *params_tensors([params], logits.device))[0, x].item())
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_eval_alpha_cli_prints_json(tmp_path, capsys):
    ckpt = write_tiny_checkpoint(tmp_path / "m")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": t}) for t in ["hello world", "the model"]))
    assert main(["eval", "alpha", "--model", str(ckpt), "--decoder", "ar", "--prompts", str(prompts),
                 "--max-tokens", "8", "--seed", "0"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["alpha"] == pytest.approx(1.0, abs=1e-5) and res["requests"] == 2
    assert main(["eval", "alpha", "--model", str(ckpt), "--decoder", "isd", "--stride", "3",
                 "--max-tokens", "8", "--seed", "0"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= res["alpha"] <= 1 and res["decoder"] == "isd" and res["stride"] == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    assert main(["eval", "alpha", "--model", str(ckpt), "--prompts", str(bad)]) == 2
    assert 'expected a JSON object with a "prompt" field' in capsys.readouterr().err
