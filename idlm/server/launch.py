"""`idlm serve`: parse the server options, load model + engine, run uvicorn.

Why it exists: it keeps the serving CLI (its options, the official `--dllm-algorithm-config` YAML and
its validation) out of `idlm/cli.py` and out of the app, so the app stays testable with any engine.
Every bad option raises `IdlmError` (the CLI prints `error: ...` and exits 2).
"""

from __future__ import annotations

import argparse

from idlm.errors import ConfigError

# The official release's algorithm config keys. Keys marked "accepted" are validated and recorded but have
# no separate switch in idlm (its ISD always verifies speculatively and exactly, SPEC §4.3).
ALGORITHM_KEYS = {
    "block_size": "2N-1 (must match gen_block_size)",
    "gen_block_size": "stride N",
    "temperature": "per-request default",
    "top_k": "per-request default",
    "top_p": "per-request default",
    "use_spec_verify": "accepted (always on)",
    "verify_alpha": "per-request default",
    "draft_temperature": "per-request default (idlm's: sampled drafts from q at this temperature)",
    "verification": "per-request default (idlm's: \"block\" or \"token\" verification of the drafts)",
    "verify_num_specs": "accepted",
    "confidence_accept_threshold": "accepted",
    "fast_verify": "accepted",
    "fast_verify_topk": "accepted",
    "output_correction": "accepted",
    "conditional_lora": "accepted (R-ISD is chosen by --lora-paths)",
    "confidence_threshold": "SDAR threshold",
}

ALGORITHMS = {"IDLMBlockN": "isd", "IDLMBlock": "isd", "ISD": "isd", "RISD": "risd", "SDAR": "sdar", "AR": "ar"}


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    from idlm.cli import STRIDE_SCHEDULE_HELP, stride_arg, stride_schedule_arg
    from idlm.decoding import DECODERS
    from idlm.engine.options import ATTENTION_BACKENDS, EXACT_HELP, LORA_LAYOUT_CHOICES, LORA_LAYOUT_HELP, OVERLAP_HELP
    from idlm.models.registry import DEFAULT_MODEL

    p.add_argument("--model-path", "--model", dest="model", default=DEFAULT_MODEL,
                   help=f"checkpoint directory, .gguf file or known model name (default: {DEFAULT_MODEL})")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model-path)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (all but /health; default: no key)")
    p.add_argument("--max-running-requests", type=int, default=64, help="requests decoded together (max_num_seqs)")
    p.add_argument("--max-waiting", type=int, default=None,
                   help="queued sequences beyond this get HTTP 429 (default: 4 x --max-running-requests, at least 256)")
    p.add_argument("--max-seqs-per-request", type=int, default=256,
                   help="most sequences (prompts x n) one request may start; more is a 400")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests may finish before their responses end with an error")
    p.add_argument("--timeout-keep-alive", type=float, default=5.0, help="close idle keep-alive connections after this")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="a request body not complete this many seconds after its headers gets 408")
    p.add_argument("--dllm-algorithm", default=None,
                   help="IDLMBlockN (ISD), RISD, SDAR or AR (default: from --decoder)")
    p.add_argument("--dllm-algorithm-config", default=None,
                   help="YAML with the official algorithm keys, e.g. configs/idlm_blockN4_config.yaml (default: none)")
    p.add_argument("--decoder", default=None, choices=DECODERS,
                   help="the decoder (default: isd for an I-DLM such as idlm-tiny, risd for an AR model with a "
                        "known R-ISD adapter (or --lora-paths), else ar)")
    p.add_argument("--stride", type=stride_arg, default=None,
                   help="ISD stride N, or 'auto': the adaptive stride (default: the config's gen_block_size, else "
                        "'auto' for ISD / R-ISD — 4 with --exact or --stride-schedule — and 4 otherwise)")
    p.add_argument("--stride-schedule", type=stride_schedule_arg, default=None,
                   help=STRIDE_SCHEDULE_HELP + " (default: none, --stride always)")
    p.add_argument("--branches", action="store_true",
                   help="ISD / R-ISD rejection branches: each step also drafts from every possible rejection point, "
                        "so no round restarts cold (N² query tokens a step; exact; with --stride auto the policy "
                        "prices them)")
    p.add_argument("--branches-max-batch", type=int, default=None,
                   help="with --branches: the largest decode batch that drafts them (larger ones run the plain "
                        "layout; default: every batch)")
    p.add_argument("--guesses", type=int, default=0,
                   help="with --branches and a fixed --stride: guessed corrections per draft (exact; more query "
                        "tokens a step, fewer rounds; default 0)")
    p.add_argument("--guess-rows", type=int, default=None,
                   help="with --guesses: rows of each guessed group (its guess row and W−1 MASK rows; default N−1; "
                        "1: the fewest query tokens)")
    p.add_argument("--lora-paths", "--lora", dest="lora", default=None,
                   help="R-ISD gated LoRA adapter (default: the model's known adapter, if any)")
    p.add_argument("--num-pages", "--num-blocks", dest="num_pages", type=int, default=None,
                   help="KV-cache pages (--num-blocks: the old name; default: CUDA: from free GPU memory; "
                        "CPU: what the model and "
                        "--max-running-requests need, at most 1 GiB)")
    p.add_argument("--attention-backend", dest="attention", default="auto", choices=ATTENTION_BACKENDS,
                   help="paged attention of decode steps: Triton kernel (auto: on CUDA) or gather + SDPA")
    p.add_argument("--exact", action="store_true", help=EXACT_HELP)
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=True, help=OVERLAP_HELP)
    p.add_argument("--lora-layout", default="auto", choices=LORA_LAYOUT_CHOICES, help=LORA_LAYOUT_HELP)
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="before listening, run every stride the engine may use (greedy and sampled) on a dummy "
                        "request, so compiling and capturing decode steps does not stall the first requests "
                        "(default: on for --stride auto on CUDA, whose policy would otherwise stall running "
                        "requests for the compile of each stride it tries first; off elsewhere. "
                        "$IDLM_COMPILE_CACHE=FILE keeps the compiled kernels for the next start, also on "
                        "another machine: docs/engine.md)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights' dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1, ... (default: cuda if available; CPU threads: $IDLM_NUM_THREADS, "
                        "else 1 for a model under 50 M parameters, else min(physical cores, 8))")
    p.add_argument("--log-level", default="info", help="uvicorn log level")


def read_algorithm_config(path: str) -> dict:
    """The YAML's keys, validated: unknown keys and block_size != 2*gen_block_size-1 are rejected."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"cannot read --dllm-algorithm-config {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--dllm-algorithm-config {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--dllm-algorithm-config {path}: expected a mapping of keys to values")
    for k in data:
        if k not in ALGORITHM_KEYS:
            raise ConfigError(f"--dllm-algorithm-config {path}: unknown key {k!r} (known: {', '.join(ALGORITHM_KEYS)})")
    for k in ("block_size", "gen_block_size", "top_k", "verify_num_specs", "fast_verify_topk"):
        v = data.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "top_k" else 1)):
            raise ConfigError(f"--dllm-algorithm-config {path}: {k}={v!r} must be a positive integer")
    for k in ("temperature", "top_p", "verify_alpha", "confidence_accept_threshold", "confidence_threshold"):
        v = data.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ConfigError(f"--dllm-algorithm-config {path}: {k}={v!r} must be a number")
    n, bs = data.get("gen_block_size"), data.get("block_size")
    if n is not None and bs is not None and bs != 2 * n - 1:
        raise ConfigError(f"--dllm-algorithm-config {path}: block_size={bs} does not match gen_block_size={n} "
                          f"(block_size must be 2*gen_block_size-1 = {2 * n - 1})")
    if n is None and bs is not None:
        if bs % 2 == 0:
            raise ConfigError(f"--dllm-algorithm-config {path}: block_size={bs} must be odd (2N-1)")
        data["gen_block_size"] = (bs + 1) // 2
    return data


def resolve_options(args) -> dict:
    """Decoder, stride, threshold and per-request sampling defaults from the options and the YAML."""
    from idlm.decoding.sampling import SamplingParams

    cfg = read_algorithm_config(args.dllm_algorithm_config) if args.dllm_algorithm_config else {}
    decoder = args.decoder
    if args.dllm_algorithm is not None:
        algo = ALGORITHMS.get(args.dllm_algorithm)
        if algo is None:
            raise ConfigError(f"unknown --dllm-algorithm {args.dllm_algorithm!r} (known: {', '.join(ALGORITHMS)})")
        if decoder is not None and decoder != algo and not (algo == "isd" and decoder == "risd"):
            raise ConfigError(f"--dllm-algorithm {args.dllm_algorithm} conflicts with --decoder {decoder}")
        decoder = decoder or algo
    if args.lora and decoder in (None, "isd"):
        decoder = "risd"  # IDLMBlockN + a LoRA adapter = R-ISD
    # decoder None: chosen once the model is loaded (idlm.inference.choose_decoder: ISD for an I-DLM,
    # R-ISD for an AR model with a known adapter, else AR); the R-ISD adapter rule is checked there too
    stride = args.stride
    if cfg.get("gen_block_size") is not None:
        if stride is not None and stride != cfg["gen_block_size"]:
            raise ConfigError(f"--stride {stride} conflicts with gen_block_size={cfg['gen_block_size']}")
        stride = cfg["gen_block_size"]
    defaults = {k: cfg[k] for k in ("temperature", "top_k", "top_p", "verify_alpha", "draft_temperature",
                                     "verification")
                if cfg.get(k) is not None}
    SamplingParams(**defaults)  # validate (ConfigError names the key)
    if args.max_running_requests < 1:
        raise ConfigError(f"--max-running-requests {args.max_running_requests} must be >= 1")
    max_waiting = args.max_waiting if args.max_waiting is not None else max(256, 4 * args.max_running_requests)
    if max_waiting < 0:
        raise ConfigError(f"--max-waiting {args.max_waiting} must be >= 0")
    if args.max_seqs_per_request < 1:
        raise ConfigError(f"--max-seqs-per-request {args.max_seqs_per_request} must be >= 1")
    for name in ("shutdown_timeout", "timeout_keep_alive", "body_timeout"):
        v = getattr(args, name)
        if not v >= 0 or v == float("inf"):
            raise ConfigError(f"--{name.replace('_', '-')} {v} must be a finite number of seconds >= 0")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} must be in 1..65535")
    return {"decoder": decoder, "stride": stride, "threshold": cfg.get("confidence_threshold", 0.9),
            "defaults": defaults, "algorithm_config": cfg, "max_waiting": max_waiting}


def should_warm_up(flag: bool | None, stride, device_type: str) -> bool:
    """`--warmup` / `--no-warmup`, or by default: warm up an adaptive-stride engine on CUDA (each stride's
    first step compiles for tens of seconds there, and the policy tries strides while requests run)."""
    if flag is not None:
        return flag
    return stride == "auto" and device_type == "cuda"


def cmd_serve(args) -> int:
    """Serve until SIGTERM/SIGINT (exit 0, after draining for --shutdown-timeout) or until the engine
    loop dies (exit 1, so a supervisor restarts the server)."""
    import gc
    import logging

    import uvicorn

    from idlm.engine.async_engine import AsyncLLM
    from idlm.engine.llm_engine import EngineConfig, LLMEngine, freeze_gc
    from idlm.engine.options import default_stride
    from idlm.inference import load_for_inference
    from idlm.server.app import build_app
    from idlm.server.runner import Lifecycle

    opts = resolve_options(args)
    inf = load_for_inference(args.model, opts["decoder"], args.lora, args.device, args.dtype)
    model, tok, lora = inf.model, inf.tokenizer, inf.adapter
    opts["decoder"] = inf.decoder
    if opts["stride"] is None:  # not given: the adaptive stride for ISD / R-ISD (`default_stride`)
        opts["stride"] = default_stride(inf.decoder, args.exact, args.stride_schedule)
    config = EngineConfig(decoder=opts["decoder"], stride=opts["stride"], threshold=opts["threshold"],
                          max_num_seqs=args.max_running_requests, num_pages=args.num_pages,
                          attention=args.attention, stride_schedule=args.stride_schedule, exact=args.exact,
                          branches=args.branches, branches_max_batch=args.branches_max_batch, guesses=args.guesses,
                          guess_rows=args.guess_rows, overlap=args.overlap, lora_layout=args.lora_layout)
    engine = LLMEngine(model, tok, config, lora=lora)
    if should_warm_up(args.warmup, config.stride, engine.runner.device.type):
        log = logging.getLogger("idlm.server")
        log.info("warming up strides %s before listening (compiles: minutes on a fresh machine; --no-warmup "
                 "skips, $IDLM_COMPILE_CACHE keeps them)", config.strides)
        seconds = engine.warmup()
        log.info("warm-up: %.1f s (per stride: %s)", sum(seconds.values()), seconds)
    life = Lifecycle()
    exit_code = 0

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / SIGINT: drain first, then stop
            if not self.should_exit:
                life.drain(args.shutdown_timeout)
            super().handle_exit(sig, frame)

    server: Server | None = None

    def on_engine_death(error: BaseException) -> None:  # from the engine thread
        nonlocal exit_code
        exit_code = 1
        logging.getLogger("idlm.server").critical("the engine died (%r): stopping the server with exit code 1",
                                                  error)
        if server is not None and life.loop is not None and not life.loop.is_closed():
            life.loop.call_soon_threadsafe(setattr, server, "should_exit", True)
            life.drain(0)

    freeze_gc()  # model, engine and tokenizer live as long as the server: keep the collector off them
    async_llm = AsyncLLM(engine, max_waiting=opts["max_waiting"], on_death=on_engine_death).start()
    name = args.served_model_name or str(args.model)
    app = build_app(async_llm, name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                    stride=opts["stride"], sampling_defaults=opts["defaults"],
                    max_seqs_per_request=args.max_seqs_per_request, body_timeout=args.body_timeout, lifecycle=life)
    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                   timeout_keep_alive=args.timeout_keep_alive,
                                   timeout_graceful_shutdown=args.shutdown_timeout + 5))
    print(f"idlm serve: {name} ({opts['decoder']}, N={opts['stride']}) on http://{args.host}:{args.port}/v1",
          flush=True)
    try:
        server.run()
    finally:
        async_llm.close(timeout=10)
        gc.unfreeze()  # let interpreter shutdown collect them (extension modules report leaks otherwise)
    return exit_code
