"""Converting SmolLM2-135M-Instruct into an I-DLM on one GPU (issue 15), a stage per call, after
scripts/smollm2_risd.py's `stash`, `setup` and `distill` (the self-distilled responses are half of the data).

    text     general text with SmolLM2's tokenizer: `idlm data build --tokenizer smollm2-135m-instruct`
             over the machine's Python sources (stdlib + site-packages), synthetic tasks and mined instructions
    mix      `idlm data mix`: 70% the distilled responses, 30% that text (token shares)
    convert  `idlm train convert` on configs/smollm2/convert.yaml (a MASK token added; resumable; --budget s)
    sdar     the SDAR-style ablation, configs/smollm2/sdar.yaml (same data, steps, lr; resumable)
    eval     unchanged SmolLM2 (AR) vs the conversion (ISD) vs the ablation (SDAR decoding), all bf16:
             clean loss on held-out distilled responses and held-out text; α at N = 4, T = 1 and 0.7 on
             held-out chat prompts; TPF at N = 2, 3, 4, 8 (greedy and T = 0.7); HumanEval pass@1 (chat
             format); synthetic-task accuracy; per-request speed at C = 1, 16, 64 (ISD N = 4 and --stride
             auto vs SmolLM2's AR, answers ending at their end token)

Device calls (the tree must stay under 64 MiB: scripts/device_tree.py; each run right after the last):

    python scripts/device_tree.py slim --keep none
    run(carry=[".carry/smolA"]): python scripts/smollm2_risd.py stash
    run(carry=[".carry/smolB", ".whl"]): python scripts/smollm2_risd.py setup
    run(carry=[".carry/distill"]): python scripts/smollm2_risd.py unpack      (data packed by an earlier
        session's `smollm2_risd.py ... distill pack`; without it: `setup distill pack` above, ~6 min)
    run: python scripts/smollm2_convert.py text mix
    run: python scripts/smollm2_convert.py convert --budget 560                (again until done)
    run: python scripts/smollm2_convert.py sdar --budget 560                   (the ablation, same budget)
    run: python scripts/smollm2_convert.py eval
    python scripts/device_tree.py restore

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
            if args.smoke else ["--n-synthetic", "20000", "--n-eval", "50", "--max-files", "20000"])
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


def _train(args, kind: str) -> None:
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "smollm2" / f"{kind}.yaml").read_text())
    out = STATE / ("idlm" if kind == "convert" else "sdar")
    cfg.update(data=str(STATE / "mix"), out=str(out), init=args.model)
    if args.smoke:
        cfg.update(seq_len=32, batch_size=4, max_steps=6, log_every=1, eval_every=3, eval_batches=1, save_every=3,
                   dtype="fp32", warmup_steps=1)
        cfg.pop("micro_batch_size", None)
    report = run_training(kind, cfg, out, args)  # data-parallel over the GPUs, resumable, --budget
    if os.environ.get("OUT"):
        for name in ("metrics.jsonl", "loss.png"):
            if (out / name).exists():
                Path(os.environ["OUT"], f"{kind}_{name}").write_bytes((out / name).read_bytes())
    emit(kind, report)


def stage_convert(args) -> None:
    _train(args, "convert")


def stage_sdar(args) -> None:
    _train(args, "sdar")


def stage_eval(args) -> None:
    dev = ["--device", "cpu", "--dtype", "float32"] if args.smoke else ["--device", "cuda", "--dtype", "bfloat16"]
    models = {"ar": (args.model, "ar"), "idlm": (str(STATE / "idlm" / "final"), "isd"),
              "sdar": (str(STATE / "sdar" / "final"), "sdar")}
    prompts = STATE / "distill" / "prompts.jsonl" if not args.smoke else None
    n_tok = "16" if args.smoke else "256"
    out: dict = {}

    def run(key, *cmd):
        rc, text = idlm(*cmd, *dev)
        out[key] = last_json(text) if rc == 0 else {"rc": rc, "tail": text[-2000:]}
        emit("eval", out)

    for name, (model, _) in models.items():
        for data in ("distill", "text") if not args.smoke else ("text",):
            run(f"clean_loss/{name}/{data}", "eval", "loss", "--model", model, "--data", str(STATE / data),
                "--seq-len", "64" if args.smoke else "1024", "--max-windows", "8" if args.smoke else "256",
                "--clean-only")
    alpha_prompts = ["--prompts", str(prompts), "--chat"] if prompts else []
    for name in ("idlm", "sdar"):
        model, decoder = models[name]
        for n in (2, 3, 4, 8):
            for temp in ("1.0", "0.7", "0"):
                if name == "sdar" and n != 4:
                    continue
                run(f"alpha/{name}/N{n}/T{temp}", "eval", "alpha", "--model", model, "--decoder", decoder,
                    "--stride", str(n), "--temperature", temp, "--max-tokens", n_tok, *alpha_prompts)
    for name in ("ar", "idlm"):
        model, decoder = models[name]
        run(f"humaneval/{name}", "eval", "humaneval", "--model", model, "--decoder", decoder, "--stride", "4",
            "--batch", "164", *(["--limit", "3", "--max-tokens", "16"] if args.smoke else []))
        run(f"tasks/{name}", "eval", "tasks", "--model", model, "--decoder", decoder, "--stride", "4",
            *(["--limit", "8"] if args.smoke else []))
    conc = "1,2" if args.smoke else "1,16,64"
    for key, (model, decoder), stride in (("ar", models["ar"], "1"), ("isd4", models["idlm"], "4"),
                                          ("isd_auto", models["idlm"], "auto")):
        run(f"speed/{key}", "bench", "offline", "--model", model, "--decoder", decoder, "--stride", stride,
            "--concurrency", conc, "--temperature", "0,0.7", "--stop-at-eos", "--max-tokens", n_tok,
            "--reps", "1" if args.smoke else "3")
    emit("eval", out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stages", nargs="+", choices=["text", "mix", "convert", "sdar", "eval"])
    ap.add_argument("--budget", type=float, default=None, help="seconds a build/train stage may run")
    ap.add_argument("--gpus", type=int, default=None,
                    help="convert/sdar: data-parallel processes (default: every visible GPU; 1 on CPU)")
    ap.add_argument("--smoke", action="store_true", help="CPU-sized run on idlm-tiny-ar (tests this script)")
    args = ap.parse_args()
    args.model = "idlm-tiny-ar" if args.smoke else MODEL
    for s in args.stages:
        globals()[f"stage_{s}"](args)
    print(json.dumps({"summary": True, **results}), flush=True)


if __name__ == "__main__":
    main()
