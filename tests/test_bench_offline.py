"""`idlm bench offline`: the temperature × concurrency sweep, the interleaved comparison with plain AR
(`--compare-ar`, `--reps`) on a tiny random checkpoint, and the options' clean errors (exit 2)."""

from __future__ import annotations

import json
from dataclasses import asdict
from types import SimpleNamespace

import pytest
from tiny import write_tiny_checkpoint

from idlm.bench import offline
from idlm.bench.offline import (
    ar_engine_for,
    bench_compare,
    bench_offline,
    bench_prompts,
    check_bench_options,
    interleaved_steps,
    median_run,
    ratio,
    step_phases,
)
from idlm.cli import main
from idlm.decoding.sampling import SamplingParams
from idlm.engine.llm_engine import EngineConfig, LLMEngine
from idlm.errors import ConfigError
from idlm.models.loader import load_pretrained


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("bench") / "tiny", max_position_embeddings=1024)


def run_lines(capsys, *argv) -> list[dict]:
    assert main(list(argv)) == 0
    return [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]


def test_cli_temperature_sweep_with_compare_ar(ckpt, capsys):
    *rows, summary = run_lines(capsys, "bench", "offline", "--model", str(ckpt), "--decoder", "isd",
                               "--concurrency", "2", "--temperature", "0,1", "--compare-ar", "--reps", "1",
                               "--max-tokens", "3", "--num-requests", "2", "--no-cuda-graphs")
    assert summary["results"] == rows and summary["temperatures"] == [0.0, 1.0]
    assert summary["compare_ar"] is True and summary["reps"] == 1
    assert [(r["temperature"], r["concurrency"]) for r in rows] == [(0.0, 2), (1.0, 2)]
    for r in rows:
        ar = r["ar"]
        assert r["decoder"] == "isd" and r["tpf"] >= 1 and ar["tpf"] == 1.0
        assert r["generated_tokens"] == ar["generated_tokens"] == 2 * 3
        assert r["reps_per_request_tok_s"] == [r["per_request_tok_s"]] and ar["reps_throughput_tok_s"] == \
            [ar["throughput_tok_s"]]
        assert r["per_request_over_ar"] == round(r["per_request_tok_s"] / ar["per_request_tok_s"], 3)
        assert r["throughput_over_ar"] == round(r["throughput_tok_s"] / ar["throughput_tok_s"], 3)


def test_cli_without_compare_has_no_ar_side(ckpt, capsys):
    *rows, summary = run_lines(capsys, "bench", "offline", "--model", str(ckpt), "--decoder", "isd",
                               "--concurrency", "1", "--temperature", "0.7", "--reps", "2", "--max-tokens", "3",
                               "--num-requests", "1", "--no-cuda-graphs")
    assert summary["compare_ar"] is False and len(rows) == 1
    r = rows[0]
    assert r["temperature"] == 0.7 and "ar" not in r and "per_request_over_ar" not in r
    assert len(r["reps_per_request_tok_s"]) == 2 and r["per_request_tok_s"] in r["reps_per_request_tok_s"]
    assert summary["warmup_s"] is None  # a fixed stride: the workload's own warm-up pass is enough


def test_cli_adaptive_stride_warms_every_stride_up_first(ckpt, capsys, tmp_path, monkeypatch):
    """`--stride auto` may explore strides its workload's warm-up pass never reached: every one runs (compiles,
    captures) before the timed runs, and the summary says how long each took."""
    monkeypatch.setenv("IDLM_CACHE", str(tmp_path))  # the step-cost calibration's cache
    *rows, summary = run_lines(capsys, "bench", "offline", "--model", str(ckpt), "--decoder", "isd",
                               "--stride", "auto", "--concurrency", "1", "--reps", "1", "--max-tokens", "3",
                               "--num-requests", "1", "--no-cuda-graphs")
    assert sorted(int(n) for n in summary["warmup_s"]) == list(range(1, 9)) and len(rows) == 1


@pytest.mark.parametrize("argv, needle", [
    (["--decoder", "ar", "--compare-ar"], "--compare-ar"),
    (["--decoder", "isd", "--temperature", "0,-1"], "--temperature"),
    (["--decoder", "isd", "--reps", "0"], "--reps"),
    (["--decoder", "isd", "--num-requests", "0"], "--num-requests"),
])
def test_cli_bad_options_exit_2_naming_the_option(argv, needle, capsys):
    assert main(["bench", "offline", "--model", "/no/such/model", *argv]) == 2  # checked before the model loads
    assert needle in capsys.readouterr().err


def test_cli_temperature_must_be_numbers(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "offline", "--temperature", "0,warm"])
    assert e.value.code == 2 and "--temperature" in capsys.readouterr().err


def test_check_bench_options_names_the_parameter():
    check_bench_options([0.0, 0.7, 1.0], reps=3, num_requests=4, decoder="isd", compare_ar=True)
    for kwargs, param in [(dict(temperatures=[]), "temperature"), (dict(temperatures=[float("nan")]), "temperature"),
                          (dict(temperatures=[0.0], reps=0), "reps"),
                          (dict(temperatures=[0.0], num_requests=0), "num_requests"),
                          (dict(temperatures=[0.0], decoder="ar", compare_ar=True), "compare_ar")]:
        with pytest.raises(ConfigError) as e:
            check_bench_options(**kwargs)
        assert e.value.param == param


def test_median_run_and_ratio():
    runs = [{"per_request_tok_s": s, "throughput_tok_s": 10 * s, "wall_s": w}
            for s, w in [(3.0, 1), (1.0, 2), (2.0, 3)]]
    m = median_run(runs)
    assert m["per_request_tok_s"] == 2.0 and m["wall_s"] == 3  # every field from the median rep
    assert m["reps_per_request_tok_s"] == [3.0, 1.0, 2.0] and m["reps_throughput_tok_s"] == [30.0, 10.0, 20.0]
    assert median_run(runs[:2])["per_request_tok_s"] == 3.0  # even count: the upper middle
    assert median_run([{"per_request_tok_s": None, "throughput_tok_s": 1.0}])["per_request_tok_s"] is None
    assert ratio(3.0, 2.0) == 1.5 and ratio(None, 2.0) is None and ratio(3.0, 0) is None


def test_paired_ratio_is_the_median_of_the_reps_ratios():
    from idlm.bench.offline import paired_ratio

    # rep 2 ran in a slow spell for both engines: its pair still says 1.05
    assert paired_ratio([105.0, 63.0, 210.0], [100.0, 60.0, 200.0]) == 1.05
    assert paired_ratio([105.0, 10.0, 90.0], [100.0, 60.0, 100.0]) == 0.9  # the middle one of 1.05, 0.17, 0.9
    assert paired_ratio([1.0, 3.0], [1.0, 1.0]) == 2.0  # even count: the mean of the middle two
    assert paired_ratio([None, 2.0], [1.0, 0.0]) is None and paired_ratio([], []) is None


def _fake_engine(decoder: str, num_pages: int = 100):
    bm = SimpleNamespace(num_pages=num_pages, pages_needed=lambda n: -(-n // 16))
    return SimpleNamespace(config=SimpleNamespace(decoder=decoder), scheduler=SimpleNamespace(max_num_seqs=0),
                           block_manager=bm, max_query_len=5)


def test_bench_compare_interleaves_reps_and_warms_both(monkeypatch):
    calls = []

    def fake_run(engine, work, params, wave):
        calls.append((engine.config.decoder, params.temperature, wave))
        return {"per_request_tok_s": 2.0 if engine.config.decoder == "isd" else 1.0, "throughput_tok_s": 4.0}

    monkeypatch.setattr(offline, "_run", fake_run)
    eng, ar = _fake_engine("isd"), _fake_engine("ar")
    rows = bench_compare(eng, [[1, 2, 3]], [2], [0.0, 1.0], max_tokens=4, reps=3, ar_engine=ar)
    order = [d for d, t, _ in calls if t == 0.0]
    assert order == ["isd", "ar"] + ["isd", "ar", "ar", "isd", "isd", "ar"]  # warm-up, then A B, B A, A B
    assert [r["temperature"] for r in rows] == [0.0, 1.0]
    assert eng.scheduler.max_num_seqs == ar.scheduler.max_num_seqs == 2
    assert rows[0]["per_request_over_ar"] == 2.0 and rows[0]["throughput_over_ar"] == 1.0
    assert rows[0]["per_request_over_ar_paired"] == 2.0
    assert rows[0]["reps_per_request_tok_s"] == [2.0] * 3 and rows[0]["ar"]["reps_per_request_tok_s"] == [1.0] * 3


def test_bench_compare_rejects_bad_engines_and_small_pools(monkeypatch):
    monkeypatch.setattr(offline, "_run", lambda *a: pytest.fail("measured despite a bad setup"))
    with pytest.raises(ConfigError) as e:
        bench_compare(_fake_engine("ar"), [[1]], [1], [0.0], ar_engine=_fake_engine("ar"))
    assert e.value.param == "compare_ar"
    with pytest.raises(ConfigError) as e:
        bench_compare(_fake_engine("isd"), [[1]], [1], [0.0], ar_engine=_fake_engine("isd"))
    assert e.value.param == "compare_ar"
    # a wave of 4 requests of 100 + 128 + 5 tokens needs 4 · 15 pages
    with pytest.raises(ConfigError) as e:
        bench_compare(_fake_engine("isd", num_pages=59), [[0] * 100], [4], [0.0], max_tokens=128)
    assert e.value.param == "num_pages" and "--num-pages" in str(e.value)


def test_ar_engine_shares_the_model_and_config(ckpt):
    model, tok = load_pretrained(ckpt)
    eng = LLMEngine(model, tok, EngineConfig(decoder="isd", stride=3, num_pages=48, max_num_seqs=4, cuda_graphs=False))
    ar = ar_engine_for(eng)
    assert ar.model is model and ar.lora is None and ar.config.decoder == "ar"
    # the same options, except what only a drafting decoder has (AR has no stride)
    assert {**asdict(ar.config), "decoder": "isd", "stride": 3} == asdict(eng.config)
    assert ar.config.stride == 1 and ar.config.stride_schedule is None
    with pytest.raises(ConfigError):
        ar_engine_for(ar)
    # the scripts' entry point keeps its signature: one temperature, one run per concurrency
    rows = bench_offline(eng, bench_prompts(tok, 4), [1], max_tokens=3, temperature=0.5, num_requests=1, warmup=False)
    assert [(r["temperature"], r["concurrency"], r["generated_tokens"]) for r in rows] == [(0.5, 1, 3)]


@pytest.mark.parametrize("decoder, stride", [("ar", 1), ("isd", 3)])
def test_step_phases_splits_each_decode_step_and_unpatches(ckpt, decoder, stride):
    model, tok = load_pretrained(ckpt)
    eng = LLMEngine(model, tok, EngineConfig(decoder=decoder, stride=stride, num_pages=48, max_num_seqs=2,
                                             cuda_graphs=False))
    params = SamplingParams(temperature=0.7, max_tokens=13, ignore_eos=True, seed=3)
    r = step_phases(eng, bench_prompts(tok, 1)[0], params)
    assert r["steps"] == eng.counters["decode_forwards"] >= 1
    assert r["tokens_per_step"] == round(12 / r["steps"], 3)
    if decoder == "ar":
        assert r["steps"] == 12 and r["tokens_per_step"] == 1.0
    parts = r["inputs_ms"] + r["decode_ms"] + r["finish_ms"]
    assert 0 < parts <= r["step_ms"] * 1.5 and r["rest_ms"] >= 0 and r["new_graphs"] == 0
    # the rest's split: every piece measured, each within the step (medians: their sum need not match)
    finer = ("schedule_ms", "batch_ms", "apply_ms", "sync_ms", "outside_ms")
    assert all(r[k] is not None and -0.05 <= r[k] <= r["step_ms"] for k in finer)
    assert r["batch_ms"] > 0 and r["apply_ms"] > 0 and r["schedule_ms"] > 0
    # the timing wrappers are gone: the engine runs the decoders' own methods again
    assert not any(k in vars(d) for d in eng._decoders.values() for k in ("step_inputs", "finish"))
    assert "decode" not in vars(eng.runner) and not eng.has_unfinished()
    # the runner's own host pieces: its arrays every step (CPU: no staging buffers filled, no graph replayed)
    assert 0 < r["runner_arrays_ms"] <= r["decode_ms"] and r["runner_replay_ms"] is None
    from idlm.engine import model_runner
    assert "_batch_arrays" not in vars(eng.runner) and model_runner._fill.__name__ == "_fill"
    assert not {"_decode_batch", "_apply_each", "_decode"} & set(vars(eng)) and "schedule" not in vars(eng.scheduler)
    assert eng.run([bench_prompts(tok, 1)[0]], params)[0].token_ids == eng.run([bench_prompts(tok, 1)[0]],
                                                                                 params)[0].token_ids


def test_step_phases_separates_the_strides_of_an_adaptive_engine(ckpt):
    model, tok = load_pretrained(ckpt)
    eng = LLMEngine(model, tok, EngineConfig(decoder="isd", stride="auto", auto_max_stride=3, num_pages=48,
                                             max_num_seqs=1, cuda_graphs=False))
    pattern = iter([1, 3, 3, 2, 1, 3] * 10)
    step_decoder = eng._step_decoder

    def forced(decodes):  # the stride of each step set from outside (as `warmup` does), the rest unchanged
        eng._forced_stride = next(pattern)
        return step_decoder(decodes)

    eng._step_decoder = forced
    r = step_phases(eng, bench_prompts(tok, 1)[0], SamplingParams(temperature=0.7, max_tokens=9, ignore_eos=True,
                                                                  seed=1))
    by = r["by_stride"]
    assert sum(v["steps"] for v in by.values()) == r["steps"] and set(by) <= {1, 2, 3} and 1 in by and 3 in by
    assert all(0 < v["decode_ms"] <= v["step_ms"] and v["rest_ms"] >= 0 for v in by.values())


def test_interleaved_steps_times_every_case_in_turns(ckpt):
    model, tok = load_pretrained(ckpt)
    prompt = bench_prompts(tok, 1)[0]
    cases = {}
    for name, dec, temp in (("ar", "ar", 0.0), ("isd", "isd", 1.0)):
        eng = LLMEngine(model, tok, EngineConfig(decoder=dec, stride=3, num_pages=48, max_num_seqs=1,
                                                 cuda_graphs=False))
        cases[name] = (eng, prompt, SamplingParams(temperature=temp, max_tokens=5, ignore_eos=True, seed=0))
    r = interleaved_steps(cases, rounds=3, chunk=4)  # 12 decode steps each: requests restart as they finish
    assert list(r) == ["ar", "isd"] and r["ar"]["over_ar"] == 1.0 and r["isd"]["over_ar"] > 0
    assert all(len(v["rounds_ms"]) == 3 and v["step_ms"] > 0 for v in r.values())
    assert r["ar"]["tokens_per_step"] == 1.0 and r["isd"]["tokens_per_step"] >= 1.0
    assert cases["ar"][0].counters["decode_forwards"] == 12 == cases["isd"][0].counters["decode_forwards"]
    with pytest.raises(ConfigError, match="rounds >= 1"):
        interleaved_steps(cases, rounds=0)
    # fresh: each round's chunk is a new request's first steps (the last one aborted)
    cases["ar"] = (cases["ar"][0], prompt, SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    aborted = cases["ar"][0].counters["aborted"]
    interleaved_steps({"ar": cases["ar"]}, rounds=3, chunk=4, fresh=True)
    # rounds 2 and 3 abort the chunk before (50 tokens outlast 4 steps); round 1 the last run's, if unfinished
    assert cases["ar"][0].counters["aborted"] - aborted in (2, 3)
    assert cases["ar"][0].num_running == 1 and cases["ar"][0].seqs[max(cases["ar"][0].seqs, key=int)].num_computed \
        < len(prompt) + 6  # the last chunk's request: its prompt and 4 tokens (+1 drawn at prefill)


def test_stop_at_eos_lets_requests_end_and_is_reported(ckpt):
    model, tok = load_pretrained(ckpt)
    eng = LLMEngine(model, tok, EngineConfig(decoder="isd", stride=3, num_pages=96, max_num_seqs=4, cuda_graphs=False))
    eng.eos = [int(t) for t in range(model.config.vocab_size)]  # every token ends a request: 1 token each
    prompts = bench_prompts(tok, 4)
    fixed = bench_offline(eng, prompts, [2], max_tokens=5, num_requests=2, warmup=False)[0]
    natural = bench_offline(eng, prompts, [2], max_tokens=5, num_requests=2, warmup=False, stop_at_eos=True)[0]
    assert fixed["generated_tokens"] == 2 * 5 and fixed["stop_at_eos"] is False
    assert natural["generated_tokens"] == 2 and natural["stop_at_eos"] is True


def test_save_record_writes_json_under_out_atomically(tmp_path, monkeypatch):
    import json

    from idlm.bench import save_record

    monkeypatch.delenv("OUT", raising=False)
    assert save_record({"a": 1}, "r.json") is None  # no $OUT: nothing written
    monkeypatch.setenv("OUT", str(tmp_path))
    save_record({"a": 1}, "r.json")
    path = save_record({"a": 2, "stage": "second"}, "r.json")  # a later stage replaces the whole record
    assert json.loads(open(path).read()) == {"a": 2, "stage": "second"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temp files left behind


def test_cli_draft_flags_reach_every_request(ckpt, capsys, monkeypatch):
    """The decoder flags that are sampling parameters (--draft, --draft-temperature, --verification) are the
    requests' own in `bench offline`, not parsed and dropped."""
    import idlm.bench.offline as offline

    seen = []
    real = offline._run

    def recording(engine, work, params, c):
        seen.append(params)
        return real(engine, work, params, c)

    monkeypatch.setattr(offline, "_run", recording)
    run_lines(capsys, "bench", "offline", "--model", str(ckpt), "--decoder", "isd", "--concurrency", "1",
              "--temperature", "1", "--reps", "1", "--max-tokens", "3", "--num-requests", "1", "--no-cuda-graphs",
              "--draft-temperature", "0.5", "--verification", "token")
    assert seen and all(p.draft_temperature == 0.5 and p.verification == "token" for p in seen)


@pytest.mark.parametrize("command", [["eval", "humaneval"], ["eval", "tasks"]])
def test_greedy_commands_refuse_sampled_draft_flags(command, capsys):
    """Commands that decode greedily name the flag that would change nothing, before loading anything."""
    assert main([*command, "--model", "idlm-tiny-ar", "--decoder", "risd", "--verification", "token"]) == 2
    assert "decodes greedily: --verification token would change nothing" in capsys.readouterr().err


def test_profiled_stages_run_after_the_timed_ones():
    """A driver's torch.profiler stages go last (CUPTI stays attached after a profile and slows every later
    CUDA call of the process), each group keeping its given order."""
    from idlm.bench import timed_before_profiled

    got = timed_before_profiled(["profile", "step", "sprofile", "stime", "exact"], {"profile", "sprofile"})
    assert got == ["step", "stime", "exact", "profile", "sprofile"]
    assert timed_before_profiled(["step"], {"profile"}) == ["step"]


def test_records_split_the_decode_steps_into_chained_and_synchronous(ckpt):
    """Every bench record says how many decode steps chained behind the one before (overlapped, here on CPU
    through the graph path's eager stand-ins) and how many ran synchronously (they add up to the record's
    decode forwards), why in-flight steps were drained (requests finishing here) and the stride changes."""
    model, tok = load_pretrained(ckpt)
    eng = LLMEngine(model, tok, EngineConfig(decoder="isd", stride=3, num_pages=64, max_num_seqs=2))
    eng.runner.use_graphs = True  # the graph path on CPU (`_EagerGraph`): steps chain
    row = bench_offline(eng, bench_prompts(tok, 4), [2], max_tokens=12, num_requests=4, warmup=False)[0]
    assert row["chained_steps"] + row["sync_steps"] == row["batch_forwards"]
    assert row["chained_steps"] > 0 and row["chained_step_ms"] > 0 and row["sync_step_ms"] > 0
    # (a drained step may be the last: a break need not be followed by a synchronous step)
    assert row["stride_changes"] == 0 and row["chain_breaks"].get("batch", 0) > 0 and row["prefill_s"] > 0
    assert set(row["chain_breaks"]) <= {"batch", "admit", "table", "pages", "length"}
