"""Time of one full fine-tuning step of issue 15's conversion objectives (SPEC §3 `idlm_loss`, the SDAR
ablation's `sdar_loss`) on a SmolLM2-135M-shaped model with a MASK row, as `idlm train convert` runs them:
fp32 master weights, bf16 autocast on CUDA, fused AdamW, micro-batches accumulated, grad clipping,
eager and under torch.compile.

Why it exists: the conversion must train, evaluate and report inside one session's device time (a 270 MB
model cannot leave the GPU machine), so the number of steps a call can afford is planned from this.

    python scripts/convert_train_step.py --device cuda --batch 64 --micro 32 --seq 1024   (the H200 plan)
    python scripts/convert_train_step.py                                                 (CPU, a tiny shape)

Random weights and tokens (the cost does not depend on the values). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default=None, help="a named shape (e.g. smollm2-135m; default on CUDA), else tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per setting (after one untimed)")
    ap.add_argument("--kinds", default="convert,sdar")
    ap.add_argument("--compile", default="0,1", help="0 eager, 1 torch.compile (CUDA only)")
    args = ap.parse_args()

    import dataclasses

    import torch

    from idlm.models.config import ModelConfig
    from idlm.models.random import shape_config
    from idlm.models.transformer import Transformer
    from idlm.training.trainer import Objective

    dev = torch.device(args.device)
    shape = args.shape or ("smollm2-135m" if dev.type == "cuda" else None)
    if shape:
        cfg = shape_config(shape)
    else:
        cfg = ModelConfig(family="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, qk_norm=False,
                          max_position_embeddings=4096)
    cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size + 1, mask_token_id=cfg.vocab_size)  # + a MASK row
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size - 1, (args.batch, args.seq + 1), generator=g).to(dev)
    lossmask = torch.ones_like(tokens, dtype=torch.bool)
    lossmask[:, : args.seq // 6] = False  # a prompt
    out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "shape": shape or "tiny", "batch": args.batch, "micro": args.micro, "seq": args.seq, "results": {}}
    for kind in args.kinds.split(","):
        for compiled in [c == "1" for c in args.compile.split(",")]:
            if compiled and dev.type != "cuda":
                continue
            model = Transformer(cfg).init_weights(std=0.02, seed=0).to(dev)
            tc = SimpleNamespace(kind=kind, clean_loss_scale="auto", attention="auto")
            module = Objective(tc, model)
            run = torch.compile(module) if compiled else module
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
            autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda"
                        else torch.autocast("cpu", enabled=False))
            times = []
            t_first = time.perf_counter()
            for step in range(args.steps + 1):
                t0 = time.perf_counter()
                for i in range(0, args.batch, args.micro):
                    with autocast:
                        loss = run(tokens[i: i + args.micro], lossmask[i: i + args.micro], 4)["loss"]
                    (loss / (args.batch // args.micro)).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                if step == 0:
                    first_s = time.perf_counter() - t_first
            step_s = statistics.median(times[1:])
            key = f"{kind}/{'compiled' if compiled else 'eager'}"
            out["results"][key] = {"step_s": round(step_s, 4), "first_step_s": round(first_s, 1),
                                   "tokens_per_s": round(args.batch * args.seq / step_s),
                                   "loss": round(float(loss.detach()), 4),
                                   "peak_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 1)
                                   if dev.type == "cuda" else None}
            print(json.dumps({key: out["results"][key]}), flush=True)
            del model, module, run, opt
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
