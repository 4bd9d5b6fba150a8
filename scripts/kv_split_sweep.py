"""GPU check of the split-KV paged kernel alone: every (batch, table pages, splits, query length) of a grid
launched eagerly and synchronised one by one, so an out-of-bounds access fails at the shape that causes
it (run with CUDA_LAUNCH_BLOCKING=1), and each split result compared with the unsplit one.

Why it exists: the engine's distillation of the real SmolLM2 hit an illegal memory access in CUDA-graph
decode steps (docs/engine.md); this sweep (840 shapes, SmolLM2's 3 KV heads of 64 with 3 query heads
each, bf16) passed on the H200, which put the fault outside the attention kernel's own indexing (it was
most likely `store_kv` reading strided slots, fixed since).

    CUDA_LAUNCH_BLOCKING=1 python scripts/kv_split_sweep.py      (prints the shape before each launch; a JSON line last)
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from idlm.layers.paged_kernel import paged_attention  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    rng = random.Random(0)
    page, hkv, group, d, pages_total = 16, 3, 3, 64, 4096
    kp = torch.randn(pages_total * page + 1, hkv, d, device="cuda", dtype=torch.bfloat16)
    vp = torch.randn_like(kp)
    worst, n = 0.0, 0
    for B, M, T in itertools.product([1, 2, 3, 8, 17, 43], [1, 3, 16, 33, 64, 97, 128, 161, 256, 512], [1, 7]):
        tables = torch.randint(0, pages_total, (B, M), device="cuda")
        starts = torch.tensor([rng.randrange(0, M * page - T + 1) if M * page > T else 0 for _ in range(B)],
                              device="cuda")
        last = (starts[:, None] + torch.arange(T, device="cuda")).clamp(max=M * page - 1)
        q = torch.randn(B, T, hkv * group, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        ref = None
        for S in (1, 2, 3, 5, 8, 16, 32):
            print(json.dumps({"B": B, "pages": M, "splits": S, "T": T}), flush=True)
            out = paged_attention(q, kp, vp, tables, last, page, splits=S)
            torch.cuda.synchronize()
            ref = out if ref is None else ref
            worst = max(worst, (out.float() - ref.float()).abs().max().item())
            n += 1
    print(json.dumps({"launches": n, "max_abs_diff_vs_unsplit": worst}))


if __name__ == "__main__":
    main()
