"""`idlm serve`: parse the server options, load model + engine, run uvicorn.

Why it exists: it keeps the serving CLI (its options, the official `--dllm-algorithm-config` YAML and
its validation) out of `idlm/cli.py` and out of the app, so the app stays testable with any engine.
Every bad option raises `IdlmError` (the CLI prints `error: ...` and exits 2).
"""

from __future__ import annotations

import argparse

from idlm.errors import ConfigError, IdlmError

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
    from idlm.layers.paged_kernel import ATTENTION_BACKENDS
    from idlm.models.registry import DEFAULT_MODEL

    p.add_argument("--model-path", "--model", dest="model", default=DEFAULT_MODEL,
                   help=f"checkpoint directory, .gguf file or known model name (default: {DEFAULT_MODEL})")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model-path)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (all but /health)")
    p.add_argument("--max-running-requests", type=int, default=64, help="requests decoded together (max_num_seqs)")
    p.add_argument("--max-waiting", type=int, default=None, help="queued requests beyond this get HTTP 429")
    p.add_argument("--dllm-algorithm", default=None, help="IDLMBlockN (ISD), RISD, SDAR or AR")
    p.add_argument("--dllm-algorithm-config", default=None, help="YAML with the official algorithm keys")
    p.add_argument("--decoder", default=None, choices=["ar", "isd", "risd", "sdar"],
                   help="default: isd (risd with --lora-paths)")
    p.add_argument("--stride", type=int, default=None, help="ISD stride N (default 4, or gen_block_size)")
    p.add_argument("--lora-paths", "--lora", dest="lora", default=None, help="R-ISD gated LoRA adapter")
    p.add_argument("--num-blocks", type=int, default=None, help="KV pages (default: from free memory)")
    p.add_argument("--attention-backend", dest="attention", default="auto", choices=ATTENTION_BACKENDS,
                   help="paged attention of decode steps: Triton kernel (auto: on CUDA) or gather + SDPA")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--log-level", default="info")


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
    if decoder is None:
        decoder = "risd" if args.lora else "isd"
    if args.lora and decoder == "isd":
        decoder = "risd"  # IDLMBlockN + a LoRA adapter = R-ISD
    if decoder == "risd" and not args.lora:
        raise ConfigError("--decoder risd needs --lora-paths PATH (the gated LoRA adapter of the base model)")
    if args.lora and decoder != "risd":
        raise ConfigError(f"--lora-paths is only used by R-ISD, not --decoder {decoder}")
    stride = args.stride
    if cfg.get("gen_block_size") is not None:
        if stride is not None and stride != cfg["gen_block_size"]:
            raise ConfigError(f"--stride {stride} conflicts with gen_block_size={cfg['gen_block_size']}")
        stride = cfg["gen_block_size"]
    defaults = {k: cfg[k] for k in ("temperature", "top_k", "top_p", "verify_alpha") if cfg.get(k) is not None}
    SamplingParams(**defaults)  # validate (ConfigError names the key)
    if args.max_running_requests < 1:
        raise ConfigError(f"--max-running-requests {args.max_running_requests} must be >= 1")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} must be in 1..65535")
    return {"decoder": decoder, "stride": stride or 4, "threshold": cfg.get("confidence_threshold", 0.9),
            "defaults": defaults, "algorithm_config": cfg}


def cmd_serve(args) -> int:
    import torch
    import uvicorn

    from idlm.engine.async_engine import AsyncLLM
    from idlm.engine.llm_engine import EngineConfig, LLMEngine
    from idlm.models.loader import load_pretrained, resolve_model_path
    from idlm.server.app import build_app

    opts = resolve_options(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise IdlmError(f"--device {device}: CUDA is not available on this machine")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    model, tok = load_pretrained(args.model, dtype=dtype, device=device)
    lora = None
    if args.lora:
        from idlm.layers.lora import LoRAAdapter

        lora = LoRAAdapter.load(resolve_model_path(args.lora), model.config, device=device, dtype=model.dtype)
    config = EngineConfig(decoder=opts["decoder"], stride=opts["stride"], threshold=opts["threshold"],
                          max_num_seqs=args.max_running_requests, num_blocks=args.num_blocks,
                          attention=args.attention)
    engine = LLMEngine(model, tok, config, lora=lora)
    async_llm = AsyncLLM(engine, max_waiting=args.max_waiting).start()
    name = args.served_model_name or str(args.model)
    app = build_app(async_llm, name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                    stride=opts["stride"], sampling_defaults=opts["defaults"])
    print(f"idlm serve: {name} ({opts['decoder']}, N={opts['stride']}) on http://{args.host}:{args.port}/v1",
          flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        async_llm.close(timeout=10)
    return 0
