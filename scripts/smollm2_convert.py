"""Converting SmolLM2-135M-Instruct into an I-DLM on one GPU (issue 15), a stage per call, after
scripts/smollm2_risd.py's `stash`, `setup` and `distill` (the self-distilled responses are half of the data).

    text     general text with SmolLM2's tokenizer: `idlm data build --tokenizer smollm2-135m-instruct`
             over the machine's Python sources (stdlib + site-packages), synthetic tasks and mined instructions
    mix      `idlm data mix`: 70% the distilled responses, 30% that text (token shares)
    convert  `idlm train convert` on configs/smollm2/convert.yaml (a MASK token added; resumable; --budget s)
    sdar     the SDAR-style ablation, configs/smollm2/sdar.yaml (same data, steps, lr; resumable)
    soft     the conversion with soft targets, configs/smollm2/convert_soft.yaml (each MASK learns the model's
             own clean distribution, the clean half the unchanged SmolLM2's; otherwise convert.yaml), into
             STATE/idlm_soft
    eval     unchanged SmolLM2 (AR) vs the conversion (ISD) vs the ablation (SDAR decoding); loss and α in
             fp32 (--measure-dtype), the rest bf16:
             clean loss on held-out distilled responses and held-out text; α at N = 4, T = 1 and 0.7 on
             held-out chat prompts; TPF at N = 2, 3, 4, 8 (greedy and T = 0.7); HumanEval pass@1 (chat
             format); synthetic-task accuracy; per-request speed at C = 1, 16, 64 (ISD N = 4, with
             --auto-speed also --stride auto, vs SmolLM2's AR, answers ending at their end token);
             --parts picks some, --budget stops starting commands (a second call runs the rest)

Device calls (the tree must stay under 64 MiB: scripts/device_tree.py; each run right after the last, a
machine is given back after 30 s idle). The text is built on any CPU beforehand and carried, like the
distilled data (`text` over the GPU machine's sources works too, but costs device minutes):

    SMOL_STATE=/tmp/smol python scripts/smollm2_risd.py stash setup      (here: the GGUF for the tokenizer)
    SMOL_STATE=/tmp/smol python scripts/smollm2_convert.py text --max-files 3000
    SMOL_STATE=/tmp/smol OUT=.carry/text python scripts/smollm2_risd.py pack --what text
    python scripts/device_tree.py slim --keep none
    run(carry=[".carry/smolA"]): python scripts/smollm2_risd.py stash
    run(carry=[".carry/smolB", ".whl"]): python scripts/smollm2_risd.py setup
    run(carry=[".carry/distill", ".carry/text"]): python scripts/smollm2_risd.py unpack --what distill &&
        python scripts/smollm2_risd.py unpack --what text && python scripts/smollm2_convert.py mix convert --budget 500
    run: python scripts/smollm2_convert.py sdar --budget 520
    run: python scripts/smollm2_convert.py eval --budget 520                   (then --parts for what it skipped)
    python scripts/device_tree.py restore

Measured (session 19, docs/training.md "The first conversion"): mix + convert 450 s; eval of one model's
loss / α / HumanEval with --jobs 5 ~270 s; AR's speed part ~100 s. Independent work shares a call: SmolLM2's
own evaluation ran beside the conversion (`eval --models ar ... &`), and an ablation's training can run beside
the conversion's evaluation. Chain the calls without a pause: the converted model exists only on the machine
(session 19 lost one, and ~600 device seconds, to a pause between calls) — write every command first.
The soft-target conversion with the ablation and every measurement, planned at ~1,650 of a session's 1,800 s:

    run(carry=[".carry/smolA"]): stash;   run(carry=[".carry/smolB", ".whl"]): setup
    run(carry=[".carry/distill", ".carry/text"]): unpack --what distill && unpack --what text && mix &&
        sdar --budget 480
    run: soft --budget 590     (estimated ~25% more per step than convert: the teacher's forward and two more
                               LM-head passes; if it pauses short of 600 steps, the next call resumes it first)
    run: OUT=$OUT/q eval --models ar,soft --parts loss,alpha,humaneval,tasks --jobs 4 --budget 200 &
                               (SmolLM2 again too: its loss and α now in fp32, the bias runs)
         OUT=$OUT/a eval --models sdar --parts loss,alpha --jobs 2 --budget 200; wait
    run: eval --models ar,soft --parts speed                            (timed: alone, last)

Measured (session 20, docs/training.md "Soft targets, the SDAR ablation and the speed"): unpack ×2 + mix + sdar
420 s (sdar 406 s, 177 k tok/s); soft 561 s (117 k tok/s); the two evals side by side were cut at 420 s
(seven processes on one GPU: one α run out of memory — SDAR's scoring, since chunked); speed of soft (with
--compare-ar) and ar 184 s. Left for a later session: the plain conversion's fp32 α (it must be trained again,
~450 s), α at T = 0.7 of soft and sdar, the synthetic tasks. By docs/training.md "The ceiling", α ≥ 0.98 at
T = 1 is out of reach for a conversion that keeps SmolLM2's distribution and drafts as cross-entropy trains it
to (0.961 for stride 2 with perfect marginal drafts), so these complete the record rather than chase the target.

A converted model (270 MB) cannot come back through the device's output: everything is measured here and
only JSON comes back ($OUT/<stage>.json). `--smoke` runs every stage CPU-sized on the embedded idlm-tiny-ar
(its own data stands in for the distilled responses) to test the script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from smollm2_risd import MODEL, REPO, STATE, emit, idlm, last_json, results, run_training  # noqa: E402


def stage_text(args) -> None:
    out = STATE / "text"
    opts = (["--roots", str(REPO / "idlm"), "--n-synthetic", "200", "--n-eval", "5", "--workers", "1"]
            if args.smoke else ["--n-synthetic", "20000", "--n-eval", "50", "--max-files", str(args.max_files)])
    rc, text = idlm("data", "build", "--out", str(out), "--tokenizer", args.model, "--no-progress", *opts,
                    budget=args.budget)
    emit("text", {"rc": rc, "summary": last_json(text)})


def stage_mix(args) -> None:
    distill = STATE / "distill"
    if args.smoke:  # a copy of the text stands in for the distilled responses
        import shutil

        shutil.copytree(STATE / "text", distill, dirs_exist_ok=True)
    rc, text = idlm("data", "mix", "--out", str(STATE / "mix"), "--from", f"{distill}:0.7",
                    "--from", f"{STATE / 'text'}:0.3")
    emit("mix", {"rc": rc, "summary": last_json(text)})


OUT_DIRS = {"convert": "idlm", "sdar": "sdar", "convert_soft": "idlm_soft"}  # config name -> STATE/<dir>


def _train(args, variant: str) -> None:
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "smollm2" / f"{variant}.yaml").read_text())
    kind = cfg["kind"]
    out = STATE / OUT_DIRS[variant]
    cfg.update(data=str(STATE / "mix"), out=str(out), init=args.model)
    if args.smoke:
        cfg.update(seq_len=32, batch_size=4, max_steps=6, log_every=1, eval_every=3, eval_batches=1, save_every=3,
                   dtype="fp32", warmup_steps=1)
        cfg.pop("micro_batch_size", None)
    report = run_training(kind, cfg, out, args)  # data-parallel over the GPUs, resumable, --budget
    if os.environ.get("OUT"):
        for name in ("metrics.jsonl", "loss.png"):
            if (out / name).exists():
                Path(os.environ["OUT"], f"{variant}_{name}").write_bytes((out / name).read_bytes())
    emit(variant, report)


def stage_convert(args) -> None:
    _train(args, "convert")


def stage_sdar(args) -> None:
    _train(args, "sdar")


def stage_soft(args) -> None:
    _train(args, "convert_soft")


EVAL_PARTS = ("loss", "alpha", "humaneval", "tasks", "speed")


def alpha_runs(smoke: bool) -> list[tuple[str, int, str]]:
    """(model, N, temperature) of the α / TPF runs: the issue's α at N = 4, T = 1 and 0.7 (and the ablation's
    beside it), TPF at N = 2, 3, 4, 8 greedy and T = 0.7 — 11 runs, not every N × T."""
    runs = [("idlm", 4, t) for t in ("1.0", "0.7", "0")]
    runs += [("idlm", n, t) for n in (2, 3, 8) for t in ("0.7", "0")]
    runs += [("sdar", 4, t) for t in ("1.0", "0.7")]
    runs += [("soft", 4, t) for t in ("1.0", "0.7", "0")]  # (only with --models ...,soft)
    return runs[:3] if smoke else runs


def alpha_prompt_file(k: int) -> Path:
    """The first k held-out prompts (in the file's hash order) as their own file: 1,179 prompts × 256 tokens
    per α run would be 300 k tokens where 65 k measure α to ±0.001."""
    path = STATE / f"alpha_prompts_{k}.jsonl"
    lines = (STATE / "distill" / "prompts.jsonl").read_text().splitlines()[:k]
    path.write_text("\n".join(lines) + "\n")
    return path


def stage_eval(args) -> None:
    """Unchanged SmolLM2 (AR) vs the conversion (ISD) vs the ablation (SDAR), the parts in `--parts` (default
    all) for the models in `--models`, each idlm command in a process of its own. `--jobs J` runs the loss,
    α and task commands J at a time beside one lane of HumanEval runs (an engine each: their KV pools are
    sized from free memory, so never two at once); the speed runs come last, alone. With --budget the stage
    starts no command once that many seconds have gone, and lists what it left (`skipped`): a second call
    runs the rest with --parts / --models. `--auto-speed` adds the adaptive stride to the speed part (its
    warm-up of eight strides is ~5 minutes)."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.time()
    device = ["--device", "cpu" if args.smoke else "cuda"]
    dtype = ["--dtype", "float32" if args.smoke else "bfloat16"]  # serving dtype: HumanEval, tasks, speed
    measure = ["--dtype", "float32" if args.smoke else args.measure_dtype]  # loss and α (see --measure-dtype)
    models = {"ar": (args.model, "ar"), "idlm": (str(STATE / "idlm" / "final"), "isd"),
              "sdar": (str(STATE / "sdar" / "final"), "sdar"), "soft": (str(STATE / "idlm_soft" / "final"), "isd")}
    n_tok = "16" if args.smoke else "256"
    parts, names = args.parts.split(","), args.models.split(",")
    for flag, got, known in (("--parts", parts, EVAL_PARTS), ("--models", names, tuple(models))):
        unknown = sorted(set(got) - set(known))
        if unknown:
            raise SystemExit(f"{flag}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    prompts = None if args.smoke else alpha_prompt_file(args.alpha_prompts)
    out: dict = {"parts": parts, "models": names, "jobs": args.jobs, "skipped": []}
    lock = threading.Lock()

    def run(key, *cmd):
        if args.budget is not None and time.time() - t0 > args.budget:
            with lock:
                out["skipped"].append(key)
            return
        t = time.time()
        rc, text = idlm(*cmd, *device, *([] if "--dtype" in cmd else dtype))
        with lock:
            out[key] = last_json(text) if rc == 0 else {"rc": rc, "tail": text[-2000:]}
            out.setdefault("cmd_wall_s", {})[key] = round(time.time() - t, 1)
            emit("eval", out)

    light, heavy, speed = [], [], []  # (key, cmd): reference-decoder runs; engine runs; timed runs
    if "loss" in parts:
        for name in names:
            for data in ("distill", "text") if not args.smoke else ("text",):
                light.append((f"clean_loss/{name}/{data}",
                              ("eval", "loss", "--model", models[name][0], "--data", str(STATE / data),
                               "--seq-len", "64" if args.smoke else "1024",
                               "--max-windows", "8" if args.smoke else "256", "--clean-only", *measure)))
    if "alpha" in parts:
        alpha_prompts = ["--prompts", str(prompts), "--chat"] if prompts else []
        for name, n, temp in alpha_runs(args.smoke):
            if name in names:
                model, decoder = models[name]
                light.append((f"alpha/{name}/N{n}/T{temp}",
                              ("eval", "alpha", "--model", model, "--decoder", decoder, "--stride", str(n),
                               "--temperature", temp, "--max-tokens", n_tok, *alpha_prompts, *measure)))
        if not args.smoke and args.measure_dtype == "float32":  # the size of bf16's bias, on this GPU: AR (α = 1
            for name in [n for n in ("ar", "idlm", "soft") if n in names]:  # by construction) in both dtypes and
                model, decoder = models[name]  # each conversion's N = 4, T = 1 again in bf16
                for dt in ("float32", "bfloat16") if name == "ar" else ("bfloat16",):
                    light.append((f"alpha/{name}/N4/T1.0" + ("/bf16" if dt == "bfloat16" else ""),
                                  ("eval", "alpha", "--model", model, "--decoder", decoder, "--stride", "4",
                                   "--temperature", "1.0", "--max-tokens", n_tok, *alpha_prompts, "--dtype", dt)))
    for name in [n for n in ("ar", "idlm", "soft") if n in names]:
        model, decoder = models[name]
        if "humaneval" in parts:
            heavy.append((f"humaneval/{name}",
                          ("eval", "humaneval", "--model", model, "--decoder", decoder, "--stride", "4",
                           "--batch", "164", *(["--limit", "3", "--max-tokens", "16"] if args.smoke else []))))
        if "tasks" in parts:
            light.append((f"tasks/{name}", ("eval", "tasks", "--model", model, "--decoder", decoder, "--stride", "4",
                                            *(["--limit", "8"] if args.smoke else []))))
    if "speed" in parts:
        conc = "1,2" if args.smoke else "1,16,64"
        choices = [("ar", "ar", "1"), ("isd4", "idlm", "4"), ("isd4_soft", "soft", "4")]
        choices += [("isd_auto", "idlm", "auto")] if args.auto_speed else []
        for key, name, stride in choices:
            if name in names:
                model, decoder = models[name]
                speed.append((f"speed/{key}",
                              ("bench", "offline", "--model", model, "--decoder", decoder, "--stride", stride,
                               "--concurrency", conc, "--temperature", "0,0.7", "--stop-at-eos", "--max-tokens", n_tok,
                               "--reps", "1" if args.smoke else "3",
                               # the same weights' AR, reps interleaved: the ratio free of run-to-run drift
                               *(["--compare-ar"] if decoder != "ar" else []))))
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        lanes = [pool.submit(lambda: [run(k, *c) for k, c in heavy])]
        lanes += [pool.submit(run, k, *c) for k, c in light]
        for lane in lanes:
            lane.result()
    for key, cmd in speed:
        run(key, *cmd)
    out["wall_s"] = round(time.time() - t0, 1)
    emit("eval", out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stages", nargs="+", choices=["text", "mix", "convert", "sdar", "soft", "eval"])
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds a build/train stage may run (resumable); eval: starts no command after that")
    ap.add_argument("--gpus", type=int, default=None,
                    help="convert/sdar: data-parallel processes (default: every visible GPU; 1 on CPU)")
    ap.add_argument("--max-files", type=int, default=20000,
                    help="text: source files at most (3000 ≈ 12 M tokens: enough for the mix's 30%% share of 20 M "
                         "distilled tokens, small enough to carry)")
    ap.add_argument("--parts", default=",".join(EVAL_PARTS),
                    help=f"eval: which measurements (comma-separated: {', '.join(EVAL_PARTS)})")
    ap.add_argument("--models", default="ar,idlm,sdar",
                    help="eval: which models (comma-separated: ar = unchanged SmolLM2, idlm = the conversion, sdar = "
                         "the ablation, soft = the soft-target conversion)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="eval: loss / α / task commands at a time (beside one HumanEval lane; speed runs alone)")
    ap.add_argument("--alpha-prompts", type=int, default=256, help="eval: the first K held-out prompts for α / TPF")
    ap.add_argument("--measure-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="eval: dtype of the loss and α runs. α = mean min(1, p/q) clips rounding noise from above, "
                         "so bf16 biases it low: SmolLM2's own AR gives 0.981 at T = 1 in bf16 on a CPU, 1.000 in "
                         "fp32 (docs/training.md)")
    ap.add_argument("--auto-speed", action="store_true", help="eval: also the adaptive stride's speed (slow warm-up)")
    ap.add_argument("--smoke", action="store_true", help="CPU-sized run on idlm-tiny-ar (tests this script)")
    args = ap.parse_args()
    args.model = "idlm-tiny-ar" if args.smoke else MODEL
    for s in args.stages:
        globals()[f"stage_{s}"](args)
    print(json.dumps({"summary": True, **results}), flush=True)


if __name__ == "__main__":
    main()
