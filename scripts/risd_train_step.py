"""Time of one R-ISD training forward + backward: the joint [x_t | x0] forward against `risd_halves`.

Why it exists: `idlm.training.objectives.risd_halves` runs the frozen base's clean half alone without
autograd and lets x_t attend to its recorded keys, instead of one forward over both halves; the two give
the same gradients (tests/test_training_objectives.py), and this script measures what the split saves,
on CPU or CUDA, for a model shape of your choice (default: small enough for a laptop CPU).

    python scripts/risd_train_step.py                                  (CPU, a 6-layer 256-wide model)
    python scripts/risd_train_step.py --device cuda --shape smollm2-135m --batch 32 --seq 1024 --rank 32

Interleaved repetitions, the first of each dropped, median. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default=None,
                    help="a named model shape (idlm.models.random: e.g. smollm2-135m); else --hidden/--layers/--vocab")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args()

    import torch

    from idlm.layers.lora import LoRAAdapter, LoRAConfig
    from idlm.models.config import ModelConfig
    from idlm.models.random import shape_config
    from idlm.models.transformer import Transformer
    from idlm.training import objectives
    from idlm.training.objectives import idlm_loss, pair_attention, pair_positions

    dev = torch.device(args.device)
    if args.shape:
        cfg = shape_config(args.shape)
        args.vocab = cfg.vocab_size
    else:
        heads = max(1, args.hidden // 64)
        cfg = ModelConfig(family="llama", vocab_size=args.vocab, hidden_size=args.hidden,
                          intermediate_size=3 * args.hidden, num_hidden_layers=args.layers, num_attention_heads=heads,
                          num_key_value_heads=max(1, heads // 2), head_dim=64, qk_norm=False,
                          max_position_embeddings=max(2048, args.seq))
    m = Transformer(cfg).init_weights(std=0.02, seed=0).to(dev).requires_grad_(False)
    lora = LoRAAdapter(cfg, LoRAConfig(args.rank, args.rank)).init_weights(seed=0, zero_b=False).to(dev)
    g = torch.Generator().manual_seed(0)
    B, L, block = args.batch, args.seq, 3
    tokens = torch.randint(0, args.vocab - 1, (B, L + 1), generator=g).to(dev)
    lossmask = torch.ones_like(tokens, dtype=torch.bool)
    lossmask[:, : L // 6] = False  # a prompt
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu",
                                                                                                       enabled=False)

    def joint():
        x0, tgt, valid = tokens[:, :-1], tokens[:, 1:], lossmask[:, 1:]
        is_mask = lossmask[:, :-1]
        x_t = torch.where(is_mask, torch.zeros_like(x0), x0)
        half = torch.zeros(B, 2 * L, device=dev)
        half[:, :L] = 1
        h = m(torch.cat([x_t, x0], 1), pair_positions(B, L, dev), pair_attention("idlm", L, block, dev), lora=lora,
              lora_gate=half, is_mask=torch.cat([is_mask, torch.zeros_like(is_mask)], 1))
        w = (is_mask & valid).flatten().float()
        return objectives._distill_ce_sums(m, h[:, :L].flatten(0, 1), h[:, L:].flatten(0, 1).detach(),
                                           tgt.flatten(), 1.0, row_weight=w)[0] / valid.sum()

    def split():
        return idlm_loss(m, tokens, lossmask, block, 0, lora=lora, distill_weight=1.0)["loss"]

    times: dict[str, list[float]] = {"joint": [], "split": []}
    for _ in range(args.reps):
        for name, fn in (("joint", joint), ("split", split)):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with autocast:
                loss = fn()
            loss.backward()
            lora.zero_grad()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    med = {k: round(statistics.median(v[1:] if len(v) > 1 else v), 4) for k, v in times.items()}
    print(json.dumps({"device": str(dev), "torch": torch.__version__, "args": vars(args),
                      "model": {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers,
                                "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                                "vocab": cfg.vocab_size}, "joint_s": med["joint"],
                      "split_s": med["split"], "speedup": round(med["joint"] / med["split"], 3)}))


if __name__ == "__main__":
    main()
