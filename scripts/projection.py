"""docs/projection.md's tables from a measured step-latency curve (issue 14): per-request tok/s of AR and
ISD N = 2/3/4/8 for an 8B-shaped model at each measured concurrency, with the paper's TPFs (SPEC §9) and,
optionally, TPFs we measured (`--tpf 2=1.7,4=2.5`). See idlm/bench/projection.py for the model.

    idlm bench latency --shape qwen3-8b --device cuda --dtype bfloat16 --query 1,3,5,7,15 \\
        --batch 1,2,4,8,16,32,64,128 --roofline > latency.jsonl        (on the GPU)
    python scripts/projection.py latency.jsonl [--key latency_qwen3_8b] [--tpf 4=2.5] [--title ...]

The input is a JSON file with the `results` rows (the last line of `idlm bench latency`, or a file
holding them under --key). Prints the markdown, and one JSON line (the projection) last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from idlm.bench.projection import PAPER_TPF, project, render_markdown  # noqa: E402


def load_rows(path: str, key: str | None) -> list[dict]:
    text = open(path).read().strip()
    try:
        data = json.loads(text)
    except ValueError:  # JSON lines: the last one is the summary
        data = json.loads(text.splitlines()[-1])
    if key:
        data = data[key]
    return data["results"] if isinstance(data, dict) else data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("latency", help="idlm bench latency output (JSON, or JSON lines)")
    ap.add_argument("--key", default=None, help="the key holding the rows in a larger JSON file")
    ap.add_argument("--tpf", default=None, help="measured TPFs, e.g. 2=1.7,4=2.5 (default: the paper's)")
    ap.add_argument("--title", default="Projected per-request tok/s")
    args = ap.parse_args()
    tpf = dict(PAPER_TPF)
    if args.tpf:
        tpf = {int(k): float(v) for k, v in (x.split("=") for x in args.tpf.split(","))}
    rows = project(load_rows(args.latency, args.key), tpf)
    print(render_markdown(rows, tpf, args.title))
    print(json.dumps({"tpf": tpf, "projection": rows}))


if __name__ == "__main__":
    main()
