"""Tests for self-distillation (idlm.data.chat_prompts, idlm.data.distill, `idlm data distill`) and the
SmolLM2 R-ISD config: the prompt builder is deterministic, de-duplicated, mixes every source and splits
by a stable text hash; distillation on the embedded idlm-tiny-ar writes shards whose loss mask covers
exactly the responses, whose responses are what the engine gives for the same prompt and sampling
parameters, end with the model's own end token (or are cut at max_tokens with none), keep held-out
prompts apart, stop at target_tokens, resume, and agree with the manifest; the CLI prints its JSON
line and rejects bad input with exit 2. Several engines (`--engines P`): the jobs are dealt by prompt,
each engine writes its own part files, and P engines (in turn in one process, or as the CLI's child
processes) give the same samples and responses as one, stop at their share of the target, resume
without duplicates and sum up in the manifest; a failed child engine fails the command, naming it, and
an interrupted command stops its children.
All on CPU, a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from idlm.cli import main
from idlm.data import DataError
from idlm.data import distill as distill_mod
from idlm.data.chat_prompts import (
    SOURCES,
    build_prompts,
    chat_prompts,
    check_weights,
    heldout_split,
    instruction_prompts,
    prompt_text,
    read_prompts,
    synthetic_prompts,
    write_prompts,
)
from idlm.data.distill import distill as run_distill
from idlm.data.distill import (
    encode_prompt,
    end_token_id,
    engine_share,
    finalize_distill,
    parse_temperatures,
    read_parts,
    sampling_params,
    stop_token_ids,
)
from idlm.data.io import read_json, read_jsonl
from idlm.data.shards import TokenDataset, load_meta, shard_paths
from idlm.engine.llm_engine import EngineConfig, LLMEngine
from idlm.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
TEMPS = (0.0, 0.7)
MAX_TOKENS = 16


def make_source_tree(root: Path, n_files: int = 6, per_file: int = 5) -> Path:
    """Python files with documented, non-trivial functions and methods (the instruction source)."""
    verbs = ["Return", "Compute", "Build", "Check whether", "Count", "Convert"]
    for f in range(n_files):
        lines = [f'"""Module {f}."""', ""]
        for i in range(per_file):
            lines += [f"def func_{f}_{i}(a, b={i}):", f'    """{verbs[(f + i) % len(verbs)]} the value number {i} '
                      f'of file {f} from a and b."""', f"    c = a * {i + 1}", "    return c + b", ""]
        lines += [f"class Thing{f}:", f'    """Thing {f}."""', "", "    def size(self, scale: int = 2) -> int:",
                  f'        """Return the size of thing {f} scaled by scale."""', "        n = len(self.items)",
                  "        return n * scale", ""]
        path = root / f"pkg{f}" / "mod.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_source_tree(tmp_path_factory.mktemp("src"))


# ---------------------------------------------------------------------------------------------
# the prompt set


def test_prompt_builder_is_deterministic_deduplicated_and_mixes_every_source(src):
    a = build_prompts(300, seed=0, roots=[str(src)], workers=1)
    b = build_prompts(300, seed=0, roots=[str(src)], workers=1)
    assert a == b and len(a) == 300
    c = build_prompts(300, seed=1, roots=[str(src)], workers=1)
    assert [prompt_text(p) for p in c] != [prompt_text(p) for p in a]
    texts = [prompt_text(p) for p in a]
    assert len(set(texts)) == len(texts) and len({p["id"] for p in a}) == len(a)
    assert {p["source"] for p in a} == set(SOURCES)
    # the weights set the mix (the instruction source here has only ~36 functions: chat fills the gap)
    counts = {s: sum(p["source"] == s for p in a) for s in SOURCES}
    assert counts["synthetic"] == 45 and 20 <= counts["instructions"] <= 36 and counts["chat"] == 300 - 45 - \
        counts["instructions"]
    inst = [p for p in a if p["source"] == "instructions"]
    assert all("func_" in prompt_text(p) or "size" in prompt_text(p) for p in inst)
    assert {p["kind"] for p in a if p["source"] == "synthetic"} == {"add", "sub", "mul", "expr", "copy", "reverse"}
    assert len({p["kind"] for p in a if p["source"] == "chat"}) >= 10


def test_prompts_are_valid_chatml_user_turns(tiny_ar, src):
    _, tok, _ = tiny_ar
    special = {tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>")}
    for p in build_prompts(200, seed=3, roots=[str(src)], workers=1):
        assert set(p) == {"id", "source", "kind", "messages", "split"}
        (msg,) = p["messages"]
        assert msg["role"] == "user" and isinstance(msg["content"], str) and msg["content"].strip()
        rendered = tok.apply_chat_template(p["messages"], add_generation_prompt=True)
        assert rendered == f"<|im_start|>user\n{msg['content']}<|im_end|>\n<|im_start|>assistant\n"
        assert not special & set(tok.encode(msg["content"]))  # no forged turn boundaries
        assert p["split"] == heldout_split(msg["content"], 0.02)


def test_heldout_split_is_stable_per_text_and_near_the_fraction(src):
    one = build_prompts(3000, seed=0, weights={"chat": 0.7, "synthetic": 0.3}, heldout_fraction=0.1)
    two = build_prompts(2000, seed=0, weights={"chat": 0.4, "synthetic": 0.6}, heldout_fraction=0.1)
    by_text = {prompt_text(p): p["split"] for p in one}
    common = [p for p in two if prompt_text(p) in by_text]
    assert len(common) > 500  # the same text in two different builds ...
    assert all(p["split"] == by_text[prompt_text(p)] for p in common)  # ... lands in the same split
    frac = sum(p["split"] == "heldout" for p in one) / len(one)
    assert 0.075 <= frac <= 0.125, frac  # ~5 standard deviations of a binomial(3000, 0.1)
    assert all(p["split"] == "train" for p in build_prompts(200, weights={"chat": 1.0}, heldout_fraction=0.0))


def test_sources_alone_and_prompt_files(src, tmp_path):
    chat = chat_prompts(5000, seed=0)
    assert len(chat) == 5000 and len({prompt_text(p) for p in chat}) == 5000
    syn = synthetic_prompts(50, seed=0)
    assert len(syn) == 50 and all(p["source"] == "synthetic" for p in syn)
    inst = instruction_prompts(1000, roots=[str(src)], workers=1)
    assert 20 <= len(inst) <= 36  # one prompt per documented function, as many as the files hold
    path = str(tmp_path / "p.jsonl")
    write_prompts(path, chat[:10])
    rows = list(read_jsonl(path))
    assert rows[0]["prompt"] == prompt_text(chat[0])  # usable as `idlm eval alpha --chat --prompts`
    assert read_prompts(path) == chat[:10]
    (tmp_path / "plain.jsonl").write_text('{"prompt": "Hi there"}\n')
    (only,) = read_prompts(str(tmp_path / "plain.jsonl"))
    assert only["messages"] == [{"role": "user", "content": "Hi there"}] and only["split"] == "train"
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "assistant", "content": "x"}]}\n')
    with pytest.raises(DataError, match="last message"):
        read_prompts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ConfigError, match="positive"):
        build_prompts(0)
    with pytest.raises(ConfigError, match="unknown prompt source"):
        check_weights({"poems": 1.0})


# ---------------------------------------------------------------------------------------------
# distillation on the embedded idlm-tiny-ar


@pytest.fixture(scope="module")
def prompts(src):
    ps = build_prompts(16, seed=0, roots=[str(src)], workers=1, heldout_fraction=0.25)
    assert {p["split"] for p in ps} == {"train", "heldout"}
    return ps


@pytest.fixture(scope="module")
def full_run(tiny_ar, prompts, tmp_path_factory):
    model, tok, _ = tiny_ar
    out = tmp_path_factory.mktemp("distill") / "run"
    manifest = run_distill(model, tok, prompts, str(out), TEMPS, max_tokens=MAX_TOKENS, max_num_seqs=8, seed=0,
                           model_name="idlm-tiny-ar", flush_samples=5, progress=False)
    return out, manifest


def _samples_from_shards(out: Path, split: str) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per sample, cut from the shard files at the loss mask's 0 -> 1 -> 0 runs."""
    paths = shard_paths(str(out), split)
    tokens = np.fromfile(paths["tokens"], dtype=np.uint16).tolist()
    mask = np.fromfile(paths["lossmask"], dtype=np.uint8).tolist()
    samples, i = [], 0
    while i < len(tokens):
        j = i
        while j < len(tokens) and mask[j] == 0:
            j += 1
        k = j
        while k < len(tokens) and mask[k] == 1:
            k += 1
        assert j > i and k > j, "every sample is a non-empty prompt (mask 0) then a non-empty response (mask 1)"
        samples.append((tokens[i:j], tokens[j:k]))
        i = k
    return samples


def test_distill_shards_mask_and_end_tokens(tiny_ar, prompts, full_run):
    model, tok, _ = tiny_ar
    out, manifest = full_run
    meta = load_meta(str(out))
    assert set(meta["splits"]) == {"train", "heldout"} and meta["vocab_size"] == model.config.vocab_size
    assert meta["tokenizer"] == "tokenizer" and (out / "tokenizer" / "tokenizer.json").is_file()
    eos = stop_token_ids(model, tok)
    end = end_token_id(tok, eos)
    assert end == tok.token_to_id("<|im_end|>")
    by_id = {p["id"]: p for p in prompts}
    for split in ("train", "heldout"):
        TokenDataset(str(out), split, seq_len=8, verify=True)  # opens, sizes and sha256 agree with meta.json
        rows = [r for r in read_parts(str(out), split)]
        shard_samples = _samples_from_shards(out, split)
        assert len(shard_samples) == len(rows) == meta["splits"][split]["samples"]
        for (prompt_ids, response_ids), row in zip(shard_samples, rows):
            assert prompt_ids == row["prompt_ids"] == encode_prompt(tok, by_id[row["id"]])
            assert response_ids == row["response_ids"]
            if row["finish"] == "length":  # cut at max_tokens: no made-up end token
                assert len(response_ids) == MAX_TOKENS and not set(response_ids) & set(eos)
            else:  # ended by the model: its own end token closes the sample
                assert row["finish"] == "stop" and len(response_ids) <= MAX_TOKENS and response_ids[-1] in eos
        assert sum(len(r) for _, r in shard_samples) == meta["splits"][split]["targets"]


def test_distill_responses_equal_the_engine_for_the_same_params(tiny_ar, prompts, full_run):
    model, tok, _ = tiny_ar
    out, _ = full_run
    rows = [r for s in ("heldout", "train") for r in read_parts(str(out), s)]
    by_id = {p["id"]: p for p in prompts}
    eos = stop_token_ids(model, tok)
    engine = LLMEngine(model, None, EngineConfig(decoder="ar", max_num_seqs=8), eos_token_ids=eos)
    outs = engine.run([encode_prompt(tok, by_id[r["id"]]) for r in rows],
                      [sampling_params(r["id"], r["temperature"], 0, MAX_TOKENS) for r in rows])
    greedy = sampled = 0
    for row, o in zip(rows, outs):
        assert row["response_ids"] == o.token_ids and row["finish"] == o.finish_reason, row["key"]
        greedy += row["temperature"] == 0
        sampled += row["temperature"] > 0
    assert greedy == sampled == len(prompts)
    # sampling is seeded per request: the two temperatures of a prompt differ somewhere
    by_key = {(r["id"], r["temperature"]): r["response_ids"] for r in rows}
    assert any(by_key[(p["id"], 0.0)] != by_key[(p["id"], 0.7)] for p in prompts)


def test_distill_heldout_prompts_and_manifest(prompts, full_run):
    out, manifest = full_run
    heldout = {p["id"] for p in prompts if p["split"] == "heldout"}
    train = {p["id"] for p in prompts if p["split"] == "train"}
    ids = {s: [r["id"] for r in read_parts(str(out), s)] for s in ("train", "heldout")}
    assert set(ids["heldout"]) == heldout and set(ids["train"]) == train  # held-out prompts only in heldout
    assert sorted(ids["heldout"]) == sorted(list(heldout) * 2)  # one sample per temperature
    assert [r["id"] for r in read_jsonl(str(out / "prompts.jsonl"))] == [p["id"] for p in prompts if p["id"] in heldout]
    assert all("prompt" in r for r in read_jsonl(str(out / "prompts.jsonl")))
    assert read_prompts(str(out / "prompt_set.jsonl")) == prompts
    meta = load_meta(str(out))
    assert read_json(str(out / "distill.json")) == manifest
    for s in ("train", "heldout"):
        assert manifest["samples"][s] == meta["splits"][s]["samples"]
        assert manifest["response_tokens"][s] == meta["splits"][s]["targets"]
        st = manifest["splits"][s]
        assert st["finish"]["stop"] + st["finish"]["length"] == st["samples"]
        assert st["prompt_tokens"] + st["response_tokens"] == meta["splits"][s]["tokens"]
        assert {t: e["samples"] for t, e in st["by_temperature"].items()} == {"0": len(ids[s]) // 2,
                                                                              "0.7": len(ids[s]) // 2}
    total = sum(manifest["response_tokens"].values())
    assert sum(manifest["tokens_per_temperature"].values()) == total
    assert sum(manifest["finish"].values()) == sum(manifest["samples"].values()) == 2 * len(prompts)
    assert manifest["stopped_early"] is False and manifest["model"] == "idlm-tiny-ar"
    assert manifest["session"]["generated_tokens"] > 0 and manifest["tok_s"] > 0 and manifest["wall_s"] > 0
    assert len(list((out / "parts").glob("train-*.jsonl"))) > 1  # flushed in several parts


def test_distill_resume_is_a_noop_and_refuses_other_settings(tiny_ar, prompts, full_run):
    model, tok, _ = tiny_ar
    out, first = full_run
    before = load_meta(str(out))
    again = run_distill(model, tok, prompts, str(out), TEMPS, max_tokens=MAX_TOKENS, max_num_seqs=8, seed=0,
                        model_name="idlm-tiny-ar", progress=False)
    assert again["session"]["finished"] == 0 and again["session"]["resumed_samples"] == 2 * len(prompts)
    assert load_meta(str(out)) == before  # the same shards, byte for byte (sha256 in meta.json)
    with pytest.raises(DataError, match="temperatures"):
        run_distill(model, tok, prompts, str(out), (0.0, 1.0), max_tokens=MAX_TOKENS, model_name="idlm-tiny-ar",
                    progress=False)
    with pytest.raises(DataError, match="prompt set differs"):
        run_distill(model, tok, prompts[:-1], str(out), TEMPS, max_tokens=MAX_TOKENS, model_name="idlm-tiny-ar",
                    progress=False)


def test_distill_target_tokens_stops_early_then_resumes_to_the_full_run(tiny_ar, prompts, full_run, tmp_path):
    model, tok, _ = tiny_ar
    full_out, full = full_run
    kw = dict(max_tokens=MAX_TOKENS, max_num_seqs=4, seed=0, model_name="idlm-tiny-ar", progress=False)
    part = run_distill(model, tok, prompts, str(tmp_path), TEMPS, target_tokens=30, **kw)
    assert part["stopped_early"] is True
    assert 30 <= part["response_tokens"]["train"] < 30 + MAX_TOKENS + 1  # stops at the sample that reaches it
    assert part["samples"]["train"] < full["samples"]["train"]
    assert part["samples"]["heldout"] == full["samples"]["heldout"]  # the held-out split is always complete
    assert load_meta(str(tmp_path))["splits"]["train"]["targets"] == part["response_tokens"]["train"]
    rest = run_distill(model, tok, prompts, str(tmp_path), TEMPS, **kw)  # no target: finish the remaining jobs
    assert rest["session"]["resumed_samples"] == part["samples"]["train"] + part["samples"]["heldout"]
    assert rest["samples"] == full["samples"] and rest["stopped_early"] is False
    key = {s: sorted((r["key"], tuple(r["response_ids"])) for r in read_parts(str(tmp_path), s)) for s in
           ("train", "heldout")}
    assert key == {s: sorted((r["key"], tuple(r["response_ids"])) for r in read_parts(str(full_out), s)) for s in
                   ("train", "heldout")}


def test_distill_rejects_bad_arguments(tiny_ar, prompts, tmp_path):
    model, tok, _ = tiny_ar
    for kw, match in (({"temperatures": (0.0, -1.0)}, "temperatures"), ({"max_tokens": 0}, "max_tokens"),
                      ({"target_tokens": 0}, "target_tokens"), ({"temperatures": (0.5, 0.5)}, "distinct")):
        with pytest.raises(ConfigError, match=match):
            run_distill(model, tok, prompts, str(tmp_path), progress=False, **kw)
    with pytest.raises(ConfigError, match="empty"):
        run_distill(model, tok, [], str(tmp_path), progress=False)
    assert parse_temperatures("0, 0.7") == (0.0, 0.7)
    for bad in ("", "0,,1", "hot", "nan"):
        with pytest.raises(ConfigError):
            parse_temperatures(bad)


# ---------------------------------------------------------------------------------------------
# several engines


def _raw_keys(out: Path) -> list[str]:
    """Every row's key in every part file (read_parts would hide duplicates)."""
    return [r["key"] for f in sorted((out / "parts").glob("*.jsonl")) for r in read_jsonl(str(f))]


def _rows_by_key(out: Path) -> dict[str, tuple]:
    return {r["key"]: (s, r["finish"], tuple(r["response_ids"]))
            for s in ("train", "heldout") for r in read_parts(str(out), s)}


def test_engine_share_deals_prompts_in_order_and_part_files_are_read_engine_by_engine(tmp_path):
    class Job:
        def __init__(self, pid, t):
            self.prompt, self.temperature = {"id": pid}, t

    jobs = [Job(p, t) for p in "abcde" for t in TEMPS]
    shares = [[(j.prompt["id"], j.temperature) for j in engine_share(jobs, 3, i)] for i in range(3)]
    assert shares == [[("a", 0.0), ("a", 0.7), ("d", 0.0), ("d", 0.7)], [("b", 0.0), ("b", 0.7), ("e", 0.0),
                      ("e", 0.7)], [("c", 0.0), ("c", 0.7)]]
    assert engine_share(jobs, 1, 0) == jobs
    for engines, index in ((0, 0), (2, 2), (2, -1), (True, 0)):
        with pytest.raises(ConfigError, match="engine"):
            engine_share(jobs, engines, index)
    parts = tmp_path / "parts"
    parts.mkdir()
    for name in ("train-e1-000000", "train-000001", "train-e0-000001", "train-000000", "train-e0-000000",
                 "heldout-e1-000000", "train-e10-000000"):
        (parts / f"{name}.jsonl").write_text(json.dumps({"key": name, "finish": "stop"}) + "\n")
    (parts / ".train-e0-000002.jsonl.tmp-x").write_text("not a part")  # an unfinished atomic write
    assert [r["key"] for r in read_parts(str(tmp_path), "train")] == [
        "train-000000", "train-000001", "train-e0-000000", "train-e0-000001", "train-e1-000000", "train-e10-000000"]
    writer = distill_mod._PartWriter(str(parts), "train", 10, 60.0, engine=0)
    assert writer.next_index == 2  # after its own files, whatever the others wrote
    assert distill_mod._PartWriter(str(parts), "train", 10, 60.0).next_index == 2  # a single engine's names


def test_two_engines_equal_one_and_resume_without_duplicates(tiny_ar, prompts, full_run, tmp_path):
    """Two engines run in turn in this process (as the CLI's processes do side by side) over six prompts:
    first to a target (each to its half), then resumed to the end; the samples and responses are the
    one-engine run's (full_run over the same prompts: per-request seeds, batch-independent responses)."""
    model, tok, _ = tiny_ar
    full_out, _ = full_run
    sub = [p for p in prompts if p["split"] == "heldout"][:2] + [p for p in prompts if p["split"] == "train"][:4]
    kw = dict(max_tokens=MAX_TOKENS, max_num_seqs=4, seed=0, model_name="idlm-tiny-ar", progress=False,
              flush_samples=2, engines=2, finalize=False)
    with pytest.raises(DataError, match="engine 0 prepares"):  # engine 1 joins a run engine 0 prepared
        run_distill(model, tok, sub, str(tmp_path), TEMPS, engine_index=1, **kw)
    sessions = [run_distill(model, tok, sub, str(tmp_path), TEMPS, target_tokens=3, engine_index=i, **kw)
                for i in range(2)]
    assert [s["target_tokens"] for s in sessions] == [2, 2] and all(s["stopped_early"] for s in sessions)
    part = finalize_distill(str(tmp_path), 2)
    names = {f.name for f in (tmp_path / "parts").iterdir()}
    assert {"heldout-e0-000000.jsonl", "heldout-e1-000000.jsonl", "train-e0-000000.jsonl", "train-e1-000000.jsonl",
            "session-e0.json", "session-e1.json"} <= names
    assert not any(distill_mod._PART_RE.match(n) and "-e" not in n for n in names)  # no single-engine names
    assert part["stopped_early"] is True and part["samples"] == {"heldout": 4, "train": 2}  # one per engine
    assert part["session"]["finished"] == 6 and [e["finished"] for e in part["session"]["engines"]] == [3, 3]
    # each engine ran its own prompts: the held-out prompt and the train prompts at its positions
    order = [p["id"] for p in sub]
    for i in range(2):
        for f in (tmp_path / "parts").glob(f"*-e{i}-*.jsonl"):
            assert all(order.index(r["id"]) % 2 == i for r in read_jsonl(str(f)))
    assert read_json(str(tmp_path / "distill.json")) == part
    # resume to the end: nothing twice, everything the one-engine run has
    for i in range(2):
        run_distill(model, tok, sub, str(tmp_path), TEMPS, engine_index=i, **kw)
    final = finalize_distill(str(tmp_path), 2)
    keys = _raw_keys(tmp_path)
    assert len(keys) == len(set(keys)) == 2 * len(sub)
    ones = _rows_by_key(full_out)
    assert _rows_by_key(tmp_path) == {k: ones[k] for k in keys}  # greedy and T = 0.7 alike
    s = final["session"]
    assert s["resumed"] is True and s["resumed_samples"] == 6 and s["finished"] == 2 * len(sub) - 6
    assert [e["resumed_samples"] + e["finished"] for e in s["engines"]] == [6, 6]
    assert s["generated_tokens"] == sum(e["generated_tokens"] for e in s["engines"]) > 0
    assert final["stopped_early"] is False and final["config"]["engines"] == 2
    assert sum(final["samples"].values()) == sum(final["finish"].values()) == 2 * len(sub)
    assert sum(final["tokens_per_temperature"].values()) == sum(final["response_tokens"].values())
    meta = load_meta(str(tmp_path))
    for split in ("train", "heldout"):
        assert final["response_tokens"][split] == meta["splits"][split]["targets"]
        assert [r for _, r in _samples_from_shards(tmp_path, split)] == [
            r["response_ids"] for r in read_parts(str(tmp_path), split)]
    with pytest.raises(DataError, match=r"2 engine\(s\), not 3"):  # the sessions of this run's engines only
        finalize_distill(str(tmp_path), 3)
    (tmp_path / "parts" / "session-e1.json").unlink()
    with pytest.raises(DataError, match="engine 1 of 2 did not finish"):
        finalize_distill(str(tmp_path), 2)


def test_distill_rejects_bad_engine_arguments(tiny_ar, prompts, tmp_path):
    model, tok, _ = tiny_ar
    for kw in ({"engines": 0}, {"engines": 2, "engine_index": 2}, {"engine_index": -1}):
        with pytest.raises(ConfigError, match="engine"):
            run_distill(model, tok, prompts, str(tmp_path), progress=False, **kw)


# ---------------------------------------------------------------------------------------------
# the command line


def test_cli_prints_one_json_line(src, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["data", "distill", "--model", "idlm-tiny-ar", "--out", str(out), "--num-prompts", "6", "--max-tokens",
            "4", "--max-num-seqs", "4", "--roots", str(src), "--workers", "1", "--temperatures", "0,0.7",
            "--heldout-fraction", "0.3", "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["prompts"] == 6 and line["model"] == "idlm-tiny-ar"
    assert sum(line["samples"].values()) == 12 and line["wall_s"] > 0 and line["tok_s"] > 0
    assert set(line["tokens_per_temperature"]) == {"0", "0.7"}
    assert line["response_tokens"]["train"] == load_meta(str(out))["splits"]["train"]["targets"]


def test_cli_two_engines_as_processes_equal_one_engine(prompts, full_run, tmp_path, capsys):
    """`--engines 2`: engine 1 is a child process (`python -m idlm.cli ... --engine-index 1`); the run
    equals the one-engine run over the same prompts, and both engines' sessions reach the manifest."""
    full_out, _ = full_run
    sub = [p for p in prompts if p["split"] == "heldout"][:1] + [p for p in prompts if p["split"] == "train"][:3]
    write_prompts(str(tmp_path / "p.jsonl"), sub)
    out = tmp_path / "cli2"
    argv = ["data", "distill", "--model", "idlm-tiny-ar", "--out", str(out), "--prompts", str(tmp_path / "p.jsonl"),
            "--max-tokens", str(MAX_TOKENS), "--max-num-seqs", "4", "--temperatures", "0,0.7", "--no-progress",
            "--device", "cpu", "--engines", "2"]
    assert main(argv) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["engines"] == 2 and sum(line["samples"].values()) == 2 * len(sub)
    ones = _rows_by_key(full_out)
    keys = _raw_keys(out)
    assert len(keys) == len(set(keys)) == 2 * len(sub) and _rows_by_key(out) == {k: ones[k] for k in keys}
    assert {f.name.split("-")[1] for f in (out / "parts").glob("*.jsonl")} == {"e0", "e1"}
    manifest = read_json(str(out / "distill.json"))
    assert [e["engine"] for e in manifest["session"]["engines"]] == [0, 1]
    assert [e["finished"] for e in manifest["session"]["engines"]] == [4, 4]
    assert manifest["session"]["finished"] == 8 and manifest["config"]["engines"] == 2


def _engine_stub(code: str):
    """A stand-in for the child engines' command line: a Python one-liner (pid file under argv[-1])."""
    def argv(args, device, dtype, index):
        return [sys.executable, "-c", code, str(Path(args.out) / f"child{index}.pid")]
    return argv


def test_cli_failed_child_engine_fails_the_command_naming_it(prompts, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(distill_mod, "_engine_argv", _engine_stub("import sys; sys.exit(3)"))
    write_prompts(str(tmp_path / "p.jsonl"), prompts[:2])
    out = tmp_path / "o"
    argv = ["data", "distill", "--model", "idlm-tiny-ar", "--out", str(out), "--prompts", str(tmp_path / "p.jsonl"),
            "--max-tokens", "2", "--no-progress", "--device", "cpu", "--engines", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "engine 1 of 2" in err and "exited with code 3" in err and "resume" in err
    assert not (out / "distill.json").exists() and (out / "parts" / "session-e0.json").exists()


def test_cli_interrupted_parent_stops_its_child_engines(prompts, tmp_path, monkeypatch):
    code = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)"
    monkeypatch.setattr(distill_mod, "_engine_argv", _engine_stub(code))
    out = tmp_path / "o"

    def interrupted(*args, **kwargs):
        deadline = time.monotonic() + 60
        while not (out / "child1.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        raise KeyboardInterrupt

    monkeypatch.setattr(distill_mod, "_generate", interrupted)
    write_prompts(str(tmp_path / "p.jsonl"), prompts[:2])
    argv = ["data", "distill", "--model", "idlm-tiny-ar", "--out", str(out), "--prompts", str(tmp_path / "p.jsonl"),
            "--no-progress", "--device", "cpu", "--engines", "2"]
    assert main(argv) == 130
    pid = int((out / "child1.pid").read_text())
    with pytest.raises(ProcessLookupError):  # terminated and reaped
        os.kill(pid, 0)


@pytest.mark.parametrize("extra, message", [
    (["--model", "/nonexistent/model-dir"], "/nonexistent/model-dir"),
    (["--model", "idlm-tiny-ar", "--num-prompts", "0"], "--num-prompts"),
    (["--model", "idlm-tiny-ar", "--max-tokens", "0"], "--max-tokens"),
    (["--model", "idlm-tiny-ar", "--temperatures", "0,hot"], "--temperatures"),
    (["--model", "idlm-tiny-ar", "--temperatures", "-1"], "--temperatures"),
    (["--model", "idlm-tiny-ar", "--prompts", "/nonexistent/prompts.jsonl"], "--prompts"),
    (["--model", "idlm-tiny-ar", "--top-p", "0"], "top_p"),
    (["--model", "idlm-tiny-ar", "--heldout-fraction", "1.5"], "--heldout-fraction"),
    (["--model", "idlm-tiny-ar", "--engines", "0"], "--engines"),
    (["--model", "idlm-tiny-ar", "--engines", "2", "--engine-index", "2"], "--engine-index"),
    (["--model", "idlm-tiny-ar", "--engines", "2", "--engine-index", "1"], "--engine-index"),
    (["--model", "idlm-tiny-ar", "--gpu-memory-utilization", "0"], "--gpu-memory-utilization"),
    (["--out-missing"], "--model"),
])
def test_cli_bad_input_exits_2_naming_the_problem(extra, message, tmp_path, capsys):
    argv = ["data", "distill", *(["--out", str(tmp_path / "o")] if extra != ["--out-missing"] else []),
            "--no-progress", "--device", "cpu", *([] if extra == ["--out-missing"] else extra)]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors (bad --temperatures, a missing required option)
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "error" in err


# ---------------------------------------------------------------------------------------------
# the SmolLM2 R-ISD training config


def test_smollm2_lora_config_parses_and_its_adapter_fits_the_asset_budget(tmp_path):
    from idlm.layers.lora import LoRAAdapter, LoRAConfig
    from idlm.models import registry
    from idlm.models.config import ModelConfig
    from idlm.models.random import SHAPES
    from idlm.models.registry import is_known
    from idlm.training.config import TrainConfig

    cfg = TrainConfig.from_yaml(REPO / "configs" / "smollm2" / "lora.yaml")
    assert cfg.kind == "lora" and cfg.init == "smollm2-135m-instruct" and is_known(cfg.init)
    assert cfg.dtype == "bf16" and cfg.curriculum[-1] == [1.0, 4] and cfg.lora_alpha == cfg.lora_rank
    assert cfg.save_every < cfg.max_steps and cfg.batch_size % (cfg.micro_batch_size or cfg.batch_size) == 0
    assert 0 < cfg.distill_weight <= 1
    shape = ModelConfig.from_hf(SHAPES["smollm2-135m"])
    assert (shape.num_hidden_layers, shape.hidden_size, shape.intermediate_size, shape.num_attention_heads,
            shape.num_key_value_heads, shape.head_dim) == (30, 576, 1536, 9, 3, 64)
    adapter = LoRAAdapter(shape, LoRAConfig(cfg.lora_rank, cfg.lora_alpha)).to(torch.bfloat16)
    adapter.save(tmp_path / "adapter")
    size = sum(f.stat().st_size for f in (tmp_path / "adapter").iterdir())
    # it must fit issue 12's 25 MB and, embedded beside the other assets, their 80 MiB (test_embedded)
    others = sum(f.stat().st_size for n in registry.embedded() if n != "smollm2-135m-instruct-risd-lora"
                 for f in registry.fetch(n).iterdir())
    card = 20_000  # room for the model card
    assert size <= 25_000_000 and others + size + card <= 80 * 1024 * 1024
    distill_cfg = (REPO / "configs" / "smollm2" / "distill.yaml").read_text()
    assert "idlm data distill" in distill_cfg and cfg.data.rstrip("/") in distill_cfg
    # the continuation: the same adapter shape, started from the shipped adapter, at the last stride
    more = TrainConfig.from_yaml(REPO / "configs" / "smollm2" / "lora_more.yaml")
    assert more.kind == "lora" and more.init == cfg.init and more.data == cfg.data
    assert (more.lora_rank, more.lora_alpha, more.distill_weight) == (cfg.lora_rank, cfg.lora_alpha, cfg.distill_weight)
    assert more.init_adapter == "smollm2-135m-instruct-risd-lora" and is_known(more.init_adapter)
    assert more.curriculum == [[1.0, 4]]
    shipped = json.loads((registry.fetch(more.init_adapter) / "adapter_config.json").read_text())
    assert (shipped["r"], shipped["lora_alpha"]) == (more.lora_rank, more.lora_alpha)
    # the acceptance-trained continuation: lora_more.yaml with the TV term (and its own steps and output)
    tv = TrainConfig.from_yaml(REPO / "configs" / "smollm2" / "lora_tv.yaml")
    differ = {k for k, v in tv.to_dict().items() if v != more.to_dict()[k]}
    assert differ == {"tv_weight", "tv_temperature", "out", "max_steps"} and 0 < tv.tv_weight < 1
    # its continuations: the same recipe into their own directories (lora_tv3 and lora_tv4, which trains on
    # another seed's data, at half the learning rate)
    for name, extra in (("lora_tv2", set()), ("lora_tv3", {"lr"}), ("lora_tv4", {"lr"})):
        cont = TrainConfig.from_yaml(REPO / "configs" / "smollm2" / f"{name}.yaml")
        assert {k for k, v in cont.to_dict().items() if v != tv.to_dict()[k]} == {"out"} | extra
        assert cont.out.endswith(name)


def test_smollm2_conversion_configs_parse_and_match():
    """configs/smollm2/convert.yaml, its SDAR ablation and its soft-target variant: same model, data, budget; a
    MASK token added."""
    from idlm.training.config import TrainConfig

    conv = TrainConfig.from_yaml(REPO / "configs" / "smollm2" / "convert.yaml")
    sdar = TrainConfig.from_yaml(REPO / "configs" / "smollm2" / "sdar.yaml")
    assert (conv.kind, sdar.kind) == ("convert", "sdar") and conv.add_mask_token and sdar.add_mask_token
    same = ("init", "data", "seq_len", "batch_size", "max_steps", "lr", "curriculum", "dtype", "min_lr_ratio")
    assert all(getattr(conv, k) == getattr(sdar, k) for k in same) and conv.init == "smollm2-135m-instruct"
    assert conv.curriculum[-1] == [1.0, 4] and conv.out != sdar.out
    soft = TrainConfig.from_yaml(REPO / "configs" / "smollm2" / "convert_soft.yaml")  # differs in the targets only
    differ = {k for k, v in soft.to_dict().items() if v != conv.to_dict()[k]}
    assert differ == {"distill_weight", "clean_distill_weight", "out"}
    assert soft.distill_weight == soft.clean_distill_weight == 1.0


def test_engines_are_dealt_over_the_gpus(monkeypatch):
    """Several GPUs: engine i on GPU i mod G, a child told its GPU through CUDA_VISIBLE_DEVICES as the parent's
    own list names it; one GPU: no environment of its own."""
    from idlm.data.distill import _child_env, engine_gpus

    assert engine_gpus(3, 1) == [0, 0, 0]
    assert engine_gpus(24, 8) == [i % 8 for i in range(24)]
    assert engine_gpus(5, 2) == [0, 1, 0, 1, 0]
    with pytest.raises(ConfigError):
        engine_gpus(0, 2)
    assert _child_env(0, 1) is None
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _child_env(3, 8)["CUDA_VISIBLE_DEVICES"] == "3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert _child_env(1, 4)["CUDA_VISIBLE_DEVICES"] == "5"
