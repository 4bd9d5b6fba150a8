"""Random engine configurations against oracles, on the CPU: what the targeted tests do not combine.

Why: every engine option is tested, but not every combination of them (the adaptive stride with a bound of 1,
rejection branches with guessed corrections at stride 2, a KV pool smaller than the stride's calibration, a
stride schedule beside branches_max_batch, ...). Each case draws a configuration of `EngineConfig` (decoder ISD
on idlm-tiny or R-ISD on idlm-tiny-ar with its adapter; fixed stride, schedule or "auto"; branches, guesses,
pages, batch limits, prefix caching; overlapped steps through the graph path's eager stand-ins) and a workload
of mixed prompts arriving at different steps (cases from EXTENDED_FROM on: also the AR and SDAR decoders, stop
tokens and a request aborted mid-run; from STOP_STRINGS_FROM on: stop strings too), then checks:

- greedy: every request's tokens equal the AR engine's on the same model (R-ISD and ISD are lossless; SDAR is
  its own algorithm: only the checks below);
- sampled, fixed stride: each seeded request run alone gives the tokens it got in the batch — reported, not
  failed: outside exact mode a CPU matmul may round a row differently at another batch size (logits ~1e-5
  apart), which can move a draw at an interval's edge (docs/exact.md: exact mode is what promises the bits);
- always: no request failed, no page held by a request after the run, the options refused only by a
  ConfigError (any other error while building the engine is a failure), and what each request streamed (the
  steps' token and text deltas joined) is its final token ids and their text (greedy: AR's text, cut at a stop
  string as AR cuts it).

    python scripts/fuzz_engine.py [FIRST] [COUNT]       (cases FIRST .. FIRST+COUNT-1; default 0 40)

One JSON line per case (its configuration and checks), a summary last; exit status 1 when a case failed.
Session 40's runs found two faults (a third came from the host-overhead work), fixed: docs/engine.md, "Random
configurations".
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import traceback

os.environ.setdefault("TRITON_INTERPRET", "1")  # (exact mode's kernels on CPU; the cases leave exact mode off)

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from idlm.bench.offline import bench_prompts  # noqa: E402
from idlm.decoding.sampling import SamplingParams  # noqa: E402
from idlm.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from idlm.errors import ConfigError  # noqa: E402
from idlm.layers.lora import LoRAAdapter  # noqa: E402
from idlm.models import registry  # noqa: E402
from idlm.models.loader import load_pretrained  # noqa: E402

# cases from here on also draw the AR and SDAR decoders, stop tokens and an abort (session 40's second round);
# the cases below it draw what they drew when their results were recorded (docs/engine.md)
EXTENDED_FROM = 10_000
# and from here on stop strings as well (drawn from a stream of their own: the rest of a case is as above)
STOP_STRINGS_FROM = 30_000


def draw_config(rng: random.Random, extended: bool = False) -> tuple[dict, bool]:
    """(EngineConfig keywords, whether a request's stride is independent of the batch: fixed, no schedule)."""
    decoders = ["isd", "risd"] * 4 + ["ar", "sdar"] if extended else ["isd", "risd"]
    cfg = dict(decoder=rng.choice(decoders), page_size=rng.choice([4, 8, 16]),
               max_num_seqs=rng.choice([1, 2, 3, 5, 8, 16]), max_num_batched_tokens=rng.choice([64, 128, 256, 1024]),
               num_pages=rng.choice([40, 60, 120, 400]), enable_prefix_caching=rng.random() < 0.5)
    fixed = True
    if rng.random() < 0.35:
        fixed = False
        cfg.update(stride="auto", auto_max_stride=rng.randint(1, 8), auto_interval=rng.randint(1, 8),
                   auto_per_row=rng.random() < 0.7)
        if rng.random() < 0.5:  # a given cost model (else the start-up calibration on this CPU)
            cfg["step_cost"] = rng.choice([(1e-3, 0.0, 1e-7), (1e-4, 0.0, 1e-3), (1e-3, 0.0, 2e-5)])
    else:
        cfg["stride"] = rng.randint(2, 8)
        if rng.random() < 0.2:
            fixed = False
            cfg["stride_schedule"] = sorted([(rng.randint(1, 4), rng.randint(1, 6)),
                                             (rng.randint(5, 16), rng.randint(1, 6))])
    if cfg["decoder"] in ("isd", "risd") and rng.random() < 0.5:
        cfg["branches"] = True
        if cfg["stride"] != "auto" and rng.random() < 0.3:
            fixed = False
            cfg["branches_max_batch"] = rng.randint(1, 6)
        if cfg["stride"] != "auto" and "stride_schedule" not in cfg and rng.random() < 0.4:
            cfg["guesses"] = rng.randint(1, 2)
            if rng.random() < 0.5:
                cfg["guess_rows"] = rng.randint(1, max(1, cfg["stride"] - 1))
    if rng.random() < 0.2:
        cfg["admit_batch"] = rng.randint(1, 4)
    return cfg, fixed


def draw_workload(rng: random.Random, tok, sampled: bool,
                  extended: bool = False) -> tuple[list[list[int]], list[SamplingParams]]:
    """2-12 chat prompts cut at random lengths, greedy or seeded sampled requests of various settings."""
    n = rng.randint(2, 12)
    prompts = [p[: rng.randint(1, len(p))] for p in bench_prompts(tok, 40)[rng.randint(0, 28):][:n]]
    top = 70 if rng.random() < 0.3 else 24
    params = []
    for i in range(n):
        if sampled:
            params.append(SamplingParams(temperature=rng.choice([0.7, 1.0, 1.3]), max_tokens=rng.randint(1, top),
                                         seed=1000 + i, top_p=rng.choice([1.0, 0.9]), top_k=rng.choice([0, 20]),
                                         verification=rng.choice(["block", "token"]),
                                         draft_temperature=rng.choice([None, 0.5]),
                                         logprobs=rng.choice([None, None, 2])))
        else:
            params.append(SamplingParams(temperature=0, max_tokens=rng.randint(1, top)))
        if extended and rng.random() < 0.15:  # a stop token (common ones: it is met)
            params[-1].stop_token_ids = [rng.randint(4, 400)]
    return prompts, params


def staggered(engine, prompts, params, per_step: int, abort: tuple[int, int] | None = None,
              streams: list | None = None) -> list:
    """Submit `per_step` new requests before each engine step; the outputs in submission order. abort (step,
    request): abort that request (if submitted and running) before that step; its output is None. streams: a
    list to receive each request's streamed (token ids, text), the steps' deltas joined."""
    ids, outs, i, steps, aborted, ids_of, text_of = [], {}, 0, 0, None, {}, {}
    while i < len(prompts) or engine.has_unfinished():
        for _ in range(per_step):
            if i < len(prompts):
                ids.append(engine.add_request(prompts[i], params[i]))
                i += 1
        if abort is not None and steps == abort[0] and abort[1] < len(ids) and engine.abort_request(ids[abort[1]]):
            aborted = ids[abort[1]]
        for o in engine.step():
            ids_of.setdefault(o.request_id, []).extend(o.new_token_ids)
            text_of[o.request_id] = text_of.get(o.request_id, "") + o.new_text
            if o.finished:
                outs[o.request_id] = o
        steps += 1
    if streams is not None:
        streams.extend((ids_of.get(r, []), text_of.get(r, "")) for r in ids)
    return [None if r == aborted else outs[r].output for r in ids]


def run_case(case: int, models: dict) -> dict:
    rng, extended = random.Random(case), case >= EXTENDED_FROM
    cfg, fixed = draw_config(rng, extended)
    model, tok, lora = models[cfg["decoder"]]
    graphs = rng.random() < 0.5  # the graph path's eager stand-ins on CPU: steps overlap (`_chain`)
    sampled = rng.random() < 0.5
    prompts, params = draw_workload(rng, tok, sampled, extended)
    if case >= STOP_STRINGS_FROM:  # stop strings, often met inside a step that commits several tokens
        srng = random.Random(-case)
        for p in params:
            if srng.random() < 0.4:
                p.stop = srng.sample(["\n", "e", "the", " (", ":", "in", "0", "ss"], srng.randint(1, 2))
    per_step = rng.randint(1, 6)
    abort = (rng.randint(0, 8), rng.randrange(len(prompts))) if extended and rng.random() < 0.2 else None
    rec = {"case": case, "sampled": sampled, "graphs": graphs, "config": cfg}

    def engine():
        eng = LLMEngine(model, tok, EngineConfig(**cfg), lora=lora)
        eng.runner.use_graphs = eng.runner.use_graphs or graphs
        return eng

    t0 = time.perf_counter()
    try:
        eng = engine()
    except ConfigError as e:
        return {**rec, "ok": True, "refused": str(e)[:200]}
    except Exception as e:  # noqa: BLE001 — anything but a ConfigError is a fault
        return {**rec, "ok": False, "error": f"building the engine: {e!r}"[:400]}
    try:
        streams = []
        got = staggered(eng, prompts, params, per_step, abort, streams)
        rec.update(failed=eng.counters["failed"], pages_held=len(eng.block_manager._seqs),
                   overlapped_steps=eng.counters["overlapped_steps"], aborted=eng.counters["aborted"])
        ok = rec["failed"] == 0 and rec["pages_held"] == 0
        kept = [i for i, o in enumerate(got) if o is not None]  # (an aborted request's output is None)
        # what was streamed is what finished: the steps' token and text deltas joined
        rec["streams_match"] = all(streams[i][0] == got[i].token_ids and (
            params[i].stop or streams[i][1] == tok.decode(got[i].token_ids, skip_special_tokens=True)) for i in kept)
        ok = ok and rec["streams_match"]
        if not sampled and cfg["decoder"] != "sdar":  # (SDAR's greedy is its own algorithm, not AR's)
            ar = LLMEngine(model, tok, EngineConfig(decoder="ar", stride=4, page_size=8, num_pages=400,
                                                    max_num_seqs=16)).run(prompts, params)
            rec["greedy_equals_ar"] = all(got[i].token_ids == ar[i].token_ids and streams[i][1] == ar[i].text
                                          and got[i].finish_reason == ar[i].finish_reason for i in kept)
            ok = ok and rec["greedy_equals_ar"]
        elif sampled and fixed:
            alone = {i: engine().run([prompts[i]], [params[i]])[0].token_ids for i in kept}
            rec["alone_differs"] = [i for i in kept if got[i].token_ids != alone[i]]
        rec["ok"] = ok
    except ConfigError as e:  # a request the pool can never hold, refused by name at submission
        rec.update(ok=True, refused=str(e)[:200])
    except Exception as e:  # noqa: BLE001
        rec.update(ok=False, error=repr(e)[:400], trace=traceback.format_exc()[-1500:])
    rec["s"] = round(time.perf_counter() - t0, 2)
    return rec


def main() -> None:
    torch.set_num_threads(1)
    first = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    tiny, tiny_ar = load_pretrained("idlm-tiny", dtype="float32"), load_pretrained("idlm-tiny-ar", dtype="float32")
    lora = LoRAAdapter.load(registry.fetch("idlm-tiny-ar-risd-lora"), tiny_ar[0].config)
    models = {"isd": (*tiny, None), "risd": (*tiny_ar, lora), "ar": (*tiny_ar, None), "sdar": (*tiny, None)}
    summary = {"cases": 0, "failed": [], "refused": 0, "alone_differs": [], "s": 0.0}
    for case in range(first, first + count):
        rec = run_case(case, models)
        print(json.dumps(rec), flush=True)
        summary["cases"] += 1
        summary["refused"] += "refused" in rec
        summary["s"] = round(summary["s"] + rec.get("s", 0.0), 1)
        if not rec["ok"]:
            summary["failed"].append(case)
        if rec.get("alone_differs"):
            summary["alone_differs"].append(case)
    print(json.dumps({"summary": True, **summary}))
    sys.exit(1 if summary["failed"] else 0)


if __name__ == "__main__":
    main()
