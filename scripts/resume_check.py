"""Does a training run resume exactly? Train a config twice with `idlm train`: once straight through, once
paused in the middle (`--stop-at-step K`: a checkpoint, no final/) and continued with `--resume`; compare
the two runs' per-step losses and gradient norms and their final weights.

    python scripts/resume_check.py convert configs/smollm2/convert.yaml --stop-at 5 --out /tmp/rc \\
        --set data=/tmp/smol/mix --set seq_len=128 --set batch_size=4 --set max_steps=8 --set dtype=fp32 ...

`--set key=value` overrides a config field (the value read as YAML). On a CPU in fp32 the curves must be
bit-identical; bf16 / compiled GPU kernels are not run-to-run deterministic, so there the differences are
reported, not judged. Last stdout line: JSON with identical_curves, identical_weights, max_abs_loss_diff.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def train(kind: str, config: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "idlm.cli", "train", kind, str(config), *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[2:])} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def curve(run: Path) -> dict[int, tuple[float, float]]:
    """step -> (loss, grad_norm); a resumed run's later entries for a step replace the earlier ones."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows if "loss" in r}


def main() -> None:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=["pretrain", "convert", "lora", "sdar"])
    ap.add_argument("config", type=Path)
    ap.add_argument("--stop-at", type=int, required=True, help="the step the second run pauses at")
    ap.add_argument("--out", type=Path, required=True, help="a fresh directory for the two runs (replaced)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    cfg = yaml.safe_load(args.config.read_text())
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        cfg[key] = yaml.safe_load(value)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    dev = ["--device", args.device] if args.device else []
    t0 = time.time()
    configs = {}
    for name in ("straight", "paused"):
        configs[name] = args.out / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump({**cfg, "out": str(args.out / name)}))
    train(args.kind, configs["straight"], *dev)
    paused = train(args.kind, configs["paused"], "--stop-at-step", str(args.stop_at), *dev)
    resumed = train(args.kind, configs["paused"], "--resume", *dev)

    from safetensors.torch import load_file

    a, b = curve(args.out / "straight"), curve(args.out / "paused")
    wa, wb = (load_file(str(args.out / n / "final" / "model.safetensors")) for n in ("straight", "paused"))
    common = sorted(set(a) & set(b))
    result = {
        "kind": args.kind, "config": str(args.config), "overrides": args.set, "stop_at": args.stop_at,
        "paused_at": paused.get("step"), "paused_stopped_early": paused.get("stopped_early", False),
        "steps_logged": [len(a), len(b)], "final_step": resumed.get("step"),
        "identical_curves": a == b,
        "max_abs_loss_diff": max((abs(a[s][0] - b[s][0]) for s in common), default=None),
        "identical_weights": wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) for k in wa),
        "curve": {s: a[s][0] for s in common}, "wall_s": round(time.time() - t0, 1),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
