"""Train and evaluate the embedded tiny models on a GPU, in stages that each fit one 10-minute call.

    python scripts/tiny_models.py stage1 --budget 500   # dataset + idlm-tiny-ar (pretrain)
    python scripts/tiny_models.py stage2 --budget 500   # idlm-tiny (convert) + R-ISD LoRA
    python scripts/tiny_models.py stage3 --budget 500   # SDAR-style baseline + all evaluations

Work lives in runs/tiny/ (git-ignored). Each stage first rebuilds what a fresh machine lacks: the
dataset (deterministic: `idlm data build`) and, from the committed assets, the models of earlier
stages. A short throughput probe sets max_steps so training fits the time budget (the LR schedule
then completes). Exports (bf16 safetensors, sharded under 15 MB, tokenizer, metrics, loss plot) are
packed into at most 8 files under $OUT (tar split in 15 MB parts). Last stdout line: one JSON object.
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

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from idlm.bench import environment  # noqa: E402
from idlm.training.config import TrainConfig  # noqa: E402
from idlm.training.trainer import Trainer  # noqa: E402

RUNS = ROOT / "runs" / "tiny"
ASSETS = ROOT / "idlm" / "assets"
OUT = Path(os.environ.get("OUT", RUNS / "out"))
T0 = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T0


def log(msg: str) -> None:
    print(f"[{elapsed():7.1f}s] {msg}", flush=True)


def ensure_data() -> Path:
    data = RUNS / "data"
    if not (data / "meta.json").exists():
        from idlm.data.build import build_dataset

        log("building the dataset")
        summary = build_dataset(str(data), vocab_size=8192, n_synthetic=200_000, n_eval=500, seed=0,
                                progress=False, workers=16)
        log(f"dataset: {json.dumps({k: summary[k] for k in ('files', 'tokens', 'vocab_size')})}")
    return data


def ensure_model(run: str, asset: str) -> Path:
    """runs/tiny/<run>/final, restored from the committed asset when this machine lacks it."""
    final = RUNS / run / "final"
    if not final.exists() and (ASSETS / asset).exists():
        log(f"restoring {final} from {ASSETS / asset}")
        shutil.copytree(ASSETS / asset, final)
    return final


def fit_steps(config: str, budget_s: float, probe_steps: int = 30) -> TrainConfig:
    """The run's config with max_steps set so training takes about budget_s seconds."""
    cfg = TrainConfig.from_yaml(ROOT / config)
    probe = TrainConfig.from_dict({**cfg.to_dict(), "out": str(RUNS / "probe"), "max_steps": probe_steps,
                                   "log_every": 10, "eval_every": 10**6, "save_every": 10**6}, source="probe")
    shutil.rmtree(RUNS / "probe", ignore_errors=True)
    t = time.perf_counter()
    Trainer(probe).train()
    rows = [json.loads(x) for x in (RUNS / "probe" / "metrics.jsonl").read_text().splitlines()]
    tps = [r for r in rows if "tokens_per_s" in r][-1]["tokens_per_s"]  # the last window: after compilation
    per_step = cfg.batch_size * (cfg.seq_len + 1)
    probe_s = time.perf_counter() - t
    left = budget_s - probe_s
    overhead = 30 + probe_s * 0.3  # evals, saves, a second (cached) compilation
    steps = int(max(50, (left - overhead) * tps / per_step))
    log(f"probe {config}: {tps:.0f} tokens/s -> max_steps {min(steps, cfg.max_steps)} (config {cfg.max_steps})")
    shutil.rmtree(RUNS / "probe", ignore_errors=True)
    d = cfg.to_dict()
    d.update(max_steps=min(steps, cfg.max_steps), warmup_steps=None, max_time_s=max(60.0, left - 15))
    return TrainConfig.from_dict(d, source=config)


def train(config: str, budget_s: float) -> dict:
    cfg = fit_steps(config, budget_s)
    shutil.rmtree(cfg.out, ignore_errors=True)
    t = time.perf_counter()
    last = Trainer(cfg).train()
    res = {"config": config, "max_steps": cfg.max_steps, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
           "tokens_seen": cfg.max_steps * cfg.batch_size * cfg.seq_len, "wall_s": round(time.perf_counter() - t, 1),
           "last": last}
    (Path(cfg.out) / "run.json").write_text(json.dumps(res, indent=2))
    log(f"trained {config}: {json.dumps(res)}")
    return res


def export(run: str, name: str, lora: bool = False) -> Path:
    """bf16 copy of runs/tiny/<run>/final + metrics and plot, packed into $OUT/<name>.tar.part-*."""
    from idlm.models.loader import load_pretrained, save_pretrained

    src, dst = RUNS / run / "final", RUNS / "export" / name
    shutil.rmtree(dst, ignore_errors=True)
    if lora:
        from idlm.layers.lora import LoRAAdapter

        base, _ = load_pretrained(RUNS / "ar" / "final")
        LoRAAdapter.load(src, base.config).to(torch.bfloat16).save(dst)
    else:
        model, tok = load_pretrained(src)
        save_pretrained(model.to(torch.bfloat16), dst, tokenizer=tok, max_shard_bytes=15_000_000)
    for f in ("metrics.jsonl", "loss.png", "run.json", "config.json"):
        if (RUNS / run / f).exists():
            shutil.copy(RUNS / run / f, dst / ("train_" + f))
    OUT.mkdir(parents=True, exist_ok=True)
    subprocess.run(f"tar -C {dst.parent} -cf - {name} | split -b 15000000 - {OUT}/{name}.tar.part-",
                   shell=True, check=True)
    return dst


def stage1(budget: float) -> dict:
    ensure_data()
    res = {"pretrain": train("configs/tiny/pretrain.yaml", budget - elapsed() - 40)}
    export("ar", "idlm-tiny-ar")
    shutil.copy(RUNS / "data" / "build.json", OUT / "data_build.json")
    return res


def stage2(budget: float) -> dict:
    ensure_data()
    ensure_model("ar", "idlm-tiny-ar")
    left = budget - elapsed() - 40
    res = {"convert": train("configs/tiny/convert.yaml", left * 0.62)}
    export("idlm", "idlm-tiny")
    res["lora"] = train("configs/tiny/lora.yaml", budget - elapsed() - 30)
    export("lora", "idlm-tiny-ar-risd-lora", lora=True)
    return res


def stage3(budget: float) -> dict:
    ensure_data()
    ensure_model("ar", "idlm-tiny-ar")
    res = {"sdar": train("configs/tiny/sdar.yaml", budget * 0.5 - elapsed())}
    export("sdar", "idlm-tiny-sdar")
    res["eval"] = evaluate()
    (OUT / "results.json").write_text(json.dumps(res, indent=2))
    return res


def convert(budget: float) -> dict:
    """Round 2: a longer conversion on its own call."""
    ensure_data()
    ensure_model("ar", "idlm-tiny-ar")
    res = {"convert": train("configs/tiny/convert.yaml", budget - elapsed() - 40)}
    export("idlm", "idlm-tiny")
    return res


def lora_eval(budget: float, eval_s: float = 130) -> dict:
    """Round 2: the R-ISD LoRA on its own call, then every evaluation."""
    ensure_data()
    ensure_model("ar", "idlm-tiny-ar")
    res = {"lora": train("configs/tiny/lora.yaml", budget - elapsed() - eval_s - 30)}
    export("lora", "idlm-tiny-ar-risd-lora", lora=True)
    res["eval"] = evaluate()
    (OUT / "results.json").write_text(json.dumps(res, indent=2))
    return res


def convert_more(budget: float, eval_s: float = 140) -> dict:
    """Round 3: continue idlm-tiny's conversion at N = 4 (configs/tiny/convert2.yaml), then evaluate."""
    ensure_data()
    ensure_model("ar", "idlm-tiny-ar")
    ensure_model("idlm", "idlm-tiny")
    res = {"convert2": train("configs/tiny/convert2.yaml", budget - elapsed() - eval_s - 30)}
    export("idlm2", "idlm-tiny")
    res["eval"] = evaluate()
    (OUT / "results.json").write_text(json.dumps(res, indent=2))
    return res


def evaluate() -> dict:
    """Everything the model cards report, on the exported (bf16-stored) models, computed in fp32."""
    from idlm.decoding import make_decoder
    from idlm.decoding.acceptance import analytic_tpf
    from idlm.decoding.reference import generate
    from idlm.decoding.sampling import SamplingParams
    from idlm.eval.alpha import introspective_alpha
    from idlm.eval.loss import heldout_loss
    from idlm.eval.tasks import COMMITTED_TASKS, evaluate_tasks, load_jsonl
    from idlm.layers.lora import LoRAAdapter
    from idlm.models.loader import load_pretrained

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ex = RUNS / "export"
    paths = {"ar": ex / "idlm-tiny-ar", "idlm": ex / "idlm-tiny", "sdar": ex / "idlm-tiny-sdar"}
    if not paths["idlm"].exists() and (RUNS / "idlm" / "final").exists():
        export("idlm", "idlm-tiny")
    for key, asset in (("ar", "idlm-tiny-ar"), ("idlm", "idlm-tiny")):
        if not paths[key].exists():
            paths[key] = ASSETS / asset
    models = {k: load_pretrained(p, device=dev) for k, p in paths.items() if p.exists()}
    lora_path = ex / "idlm-tiny-ar-risd-lora"
    lora_path = lora_path if lora_path.exists() else ASSETS / "idlm-tiny-ar-risd-lora"
    ar, tok = models["ar"]
    lora = LoRAAdapter.load(lora_path, ar.config, device=dev) if lora_path.exists() else None
    data = RUNS / "data"
    out: dict = environment(dev)

    log("held-out losses")
    out["loss"] = {k: heldout_loss(m, str(data), stride=4 if k == "idlm" else None) for k, (m, _) in models.items()}

    instr = load_jsonl(data / "eval" / "instructions.jsonl")
    tasks = load_jsonl(COMMITTED_TASKS)
    prompt_texts = [r["prompt"] for r in tasks[::10][:32]] + [r["prompt"] for r in instr[:32]]
    prompts = [tok.encode_chat([{"role": "user", "content": t}]) for t in prompt_texts]
    eos = sorted(tok.eos_token_ids)

    log("alpha")
    out["alpha"] = {}
    for key, dec, stride in (("ar", "ar", 1), ("idlm", "isd", 4), ("sdar", "sdar", 4)):
        if key not in models:
            continue
        m, t = models[key]
        torch.manual_seed(0)
        r = introspective_alpha(m, make_decoder(dec, stride, m.config, t), prompts,
                                SamplingParams(temperature=1.0, max_tokens=128), eos_token_ids=eos)
        out["alpha"][f"{key}/{dec}"] = {k: r[k] for k in ("alpha", "tokens", "stats")}

    log("TPF by stride")
    out["tpf"] = {}
    m, t = models["idlm"]
    for temp in (0.0, 1.0):
        for n in (2, 3, 4, 8):
            torch.manual_seed(0)
            outs = generate(m, make_decoder("isd", n, m.config, t), prompts,
                            SamplingParams(temperature=temp, max_tokens=128), eos_token_ids=eos)
            st = outs[0].stats
            for o in outs[1:]:
                st = st.merge(o.stats)
            p_hat = st.acceptance or 0.0
            out["tpf"][f"T={temp}/N={n}"] = {"tpf": round(st.tpf, 4), "acceptance": round(p_hat, 4),
                                              "analytic_tpf": round(analytic_tpf(p_hat, n), 4),
                                              "round_mix": st.to_dict()["round_mix"]}

    log("task accuracy")
    out["tasks"] = {}
    runs = [("ar", "ar", 1, None), ("idlm", "isd", 4, None), ("ar", "risd", 4, lora), ("sdar", "sdar", 4, None)]
    for key, dec, stride, lo in runs:
        if key not in models or (dec == "risd" and lo is None):
            continue
        m, t = models[key]
        d = make_decoder(dec, stride, m.config, t)
        out["tasks"][f"{key}/{dec}"] = evaluate_tasks(m, t, d, tasks, lora=lo)
        out["tasks"][f"{key}/{dec}"]["instructions"] = evaluate_tasks(m, t, d, instr[:64], lora=lo, max_tokens=256)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=["stage1", "stage2", "stage3", "convert", "lora_eval", "convert_more", "eval"])
    ap.add_argument("--budget", type=float, default=500.0, help="seconds this call may spend")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    res = evaluate() if args.stage == "eval" else globals()[args.stage](args.budget)
    res["wall_s"] = round(elapsed(), 1)
    (OUT / f"{args.stage}.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
