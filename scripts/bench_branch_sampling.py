"""The sampled ISD step with rejection branches: filtering only the slots a row uses (N clean + K drafts')
against filtering all N² slots (the step as first built, read from git at OLD_REV), on the CPU.

    python scripts/bench_branch_sampling.py [OLD_REV]      (default 55b3a94: before the two-phase filter)

Prints each version's time per call and whether both give the same bits; one JSON line last."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
torch.set_num_threads(1)
from idlm.decoding import isd as new  # noqa: E402

rev = sys.argv[1] if len(sys.argv) > 1 else "55b3a94"
old_src = Path("/tmp/isd_old_bench.py")
old_src.write_text(subprocess.run(["git", "show", f"{rev}:idlm/decoding/isd.py"], cwd=REPO, check=True,
                                  capture_output=True, text=True).stdout)
spec = importlib.util.spec_from_file_location("isd_old", old_src)
old = importlib.util.module_from_spec(spec)
sys.modules["isd_old"] = old
spec.loader.exec_module(old)
B, N, V = 16, 4, 49152
K = N - 1
g = torch.Generator().manual_seed(0)
logits = torch.randn(B, N * N, V, generator=g)
is_v, specs = torch.ones(B, dtype=torch.bool), torch.randint(0, V, (B, K), generator=g)  # every row verifies
temp, top_k, top_p = torch.full((B,), 0.7), torch.zeros(B, dtype=torch.long), torch.ones(B)
pm, am, alpha = torch.zeros(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool), torch.ones(B)
keys, draw = torch.randint(0, 2**31, (B, 2), generator=g), torch.arange(B)
q_old = torch.softmax(torch.randn(B, K, V, generator=g), -1)


def run(mod):
    f = getattr(mod.sampled_isd_step, "__wrapped__", mod.sampled_isd_step)
    return f(logits, is_v, specs, temp, top_k, top_p, pm, am, alpha, keys, draw, q_old, False, None, None, True)


times = {"all_slots": [], "used_slots": []}
for _ in range(2):
    for name, mod in (("all_slots", old), ("used_slots", new)):
        run(mod)
        t = time.perf_counter()
        for _ in range(5):
            run(mod)
        times[name].append(round((time.perf_counter() - t) / 5 * 1e3, 1))
a, b = run(old), run(new)
print(json.dumps({"batch": B, "stride": N, "vocab": V, "temperature": 0.7, "ms": times,
                  "same_bits": bool(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))}))
