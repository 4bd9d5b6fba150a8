"""The training loop shared by `idlm train pretrain|convert|lora|sdar`.

One loop, four objectives (`idlm.training.objectives`). What a demanding user expects of it:
- AdamW (fused on CUDA; weight decay on matrices only), linear warmup + cosine decay, gradient
  clipping, bf16 autocast on CUDA, gradient accumulation, optional torch.compile;
- data parallel through `torchrun` (DDP; the same script on one GPU or on CPU with gloo);
- metrics as JSONL (`metrics.jsonl`), a PNG loss plot, a tqdm progress bar with loss and tokens/s;
- checkpoints written atomically and durably (a temp directory, fsynced, renamed into place, then a
  `latest` pointer replaced the same way): a run killed, out of disk or losing power mid-save leaves
  the previous checkpoint intact, and the temp files it left are swept by the next save;
- exact resume: model, optimizer, scheduler, data position and RNG states; resuming from a
  checkpoint of a different config is refused.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from idlm.atomic import atomic_dir, atomic_write_text, ensure_dir, remove_abandoned, sweep_leftovers
from idlm.data.io import read_jsonl
from idlm.errors import CheckpointError, ConfigError
from idlm.training.config import NOT_FINGERPRINTED, TrainConfig
from idlm.training.objectives import ar_loss, idlm_loss, sdar_loss

# ----------------------------------------------------------------------------------- checkpoints
_STEP_NAME = re.compile(r"step-\d+")
_OLD_POINTER_TMP = re.compile(r"\.latest-[0-9a-f]{6}")  # the temp pointer name of earlier versions


def sweep_checkpoint_leftovers(ckdir: str | os.PathLike) -> list[Path]:
    """Remove what killed saves left in a checkpoints directory; returns the paths removed.

    `.step-N.tmp-XXXXXXXX` / `.step-N.old-XXXXXXXX` of every step (a killed run's half-written checkpoint
    has another step's name than the next save), `.latest.tmp-XXXXXXXX` and the older `.latest-XXXXXX`
    temp pointers. Nothing a live save holds, and nothing else, is touched (see `idlm.atomic`).
    """
    ckdir = Path(ckdir)
    removed = sweep_leftovers(ckdir, _STEP_NAME) + sweep_leftovers(ckdir, "latest")
    try:
        entries = list(os.scandir(ckdir))
    except FileNotFoundError:
        return removed
    for e in entries:
        if _OLD_POINTER_TMP.fullmatch(e.name) and not e.is_symlink() and remove_abandoned(e.path):
            removed.append(Path(e.path))
    return removed


# ----------------------------------------------------------------------------------- distributed
def dist_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment (single process: 0, 0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def lr_lambda(cfg: TrainConfig):
    """Multiplier of cfg.lr at an optimizer step: linear warmup, then cosine to min_lr_ratio."""
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


class Objective(nn.Module):
    """Model (+ adapter) and the run's loss in one module, so DDP can wrap what the forward runs."""

    def __init__(self, cfg: TrainConfig, model, adapter=None, teacher=None):
        super().__init__()
        self.cfg, self.model, self.adapter = cfg, model, adapter
        # the frozen original of a conversion (clean_distill_weight): kept out of the module's parameters and
        # state, so the optimizer, DDP and checkpoints never see it (a resumed run copies `init` again)
        self.__dict__["teacher"] = teacher

    def forward(self, tokens, lossmask, stride: int, generator=None):
        cfg, m = self.cfg, self.model
        if cfg.kind == "pretrain":
            return ar_loss(m, tokens, lossmask)
        mask = m.config.mask_token_id
        if cfg.kind == "convert":
            return idlm_loss(m, tokens, lossmask, stride - 1, mask, cfg.clean_loss_scale, attn_impl=cfg.attention,
                             distill_weight=cfg.distill_weight, clean_teacher=self.teacher,
                             clean_distill_weight=cfg.clean_distill_weight, tv_weight=cfg.tv_weight,
                             tv_temperature=cfg.tv_temperature)
        if cfg.kind == "lora":
            return idlm_loss(m, tokens, lossmask, stride - 1, mask if mask is not None else 0, lora=self.adapter,
                             attn_impl=cfg.attention, distill_weight=cfg.distill_weight,
                             position_decay=cfg.position_decay, tv_weight=cfg.tv_weight,
                             tv_temperature=cfg.tv_temperature)
        # SDAR: the curriculum's "stride" is its block size B (SPEC §6: B MASKs per block)
        return sdar_loss(m, tokens, lossmask, stride, mask, generator=generator, attn_impl=cfg.attention)


class Trainer:
    def __init__(self, cfg: TrainConfig, device: str | None = None):
        from idlm.data.shards import TokenDataset

        self.cfg = cfg
        self.rank, self.local_rank, self.world = dist_env()
        if device is None:
            device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if cfg.batch_size % self.world:
            raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by the {self.world} ranks")
        self.per_rank = cfg.batch_size // self.world
        self.micro = cfg.micro_batch_size or self.per_rank
        if self.per_rank % self.micro:
            raise ConfigError(f"per-rank batch {self.per_rank} is not divisible by micro_batch_size {self.micro}")
        self.out = Path(cfg.out)
        self.train_data = TokenDataset(cfg.data, "train", cfg.seq_len)
        self.heldout = TokenDataset(cfg.data, "heldout", cfg.seq_len)
        self.batches_per_epoch = self.train_data.steps_per_epoch(self.per_rank, self.world)
        if self.batches_per_epoch < 1:
            raise ConfigError(f"the training split has {self.train_data.num_windows} windows of {cfg.seq_len} "
                              f"tokens: fewer than one batch of {cfg.batch_size}")
        torch.manual_seed(cfg.seed)
        self.model, self.tokenizer = self._build_model()
        # the frozen original of a conversion (clean_distill_weight; config: kind convert with an init): a copy
        # of the init model as loaded, before a MASK row is added or any checkpoint is loaded into the model
        teacher = copy.deepcopy(self.model).eval().requires_grad_(False) if cfg.clean_distill_weight else None
        if cfg.add_mask_token and self.model.config.mask_token_id is None:
            self._add_mask_token()
        self.adapter = None
        if cfg.kind == "lora":
            from idlm.layers.lora import LoRAAdapter, LoRAConfig

            self.model.requires_grad_(False)
            self.adapter = LoRAAdapter(self.model.config, LoRAConfig(cfg.lora_rank, cfg.lora_alpha))
            self.adapter.init_weights(seed=cfg.seed).to(self.device)
            if cfg.init_adapter is not None:
                self._load_init_adapter(cfg.init_adapter)
        if cfg.kind != "pretrain" and cfg.kind != "lora" and self.model.config.mask_token_id is None:
            raise ConfigError(f"{cfg.kind} needs a model with a MASK token (mask_token_id): {cfg.init}")
        self.objective = Objective(cfg, self.model, self.adapter, teacher)
        trainable = [p for p in self.objective.parameters() if p.requires_grad]
        decay = [p for p in trainable if p.dim() >= 2]
        no_decay = [p for p in trainable if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.betas, fused=self.device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.step = 0
        self.generator = torch.Generator().manual_seed(cfg.seed + 1000 * self.rank)  # objective noise (SDAR)
        self.module = self.objective
        if cfg.compile and self.device.type == "cuda":
            self.module = torch.compile(self.module)
        if self.world > 1:
            self.module = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.kind == "lora")

    # --------------------------------------------------------------------------------- building
    def _add_mask_token(self) -> None:
        """A MASK token for a model without one: the tokenizer's next id and a new vocabulary row (before the
        optimizer sees the parameters; a resumed run adds the same row, then loads its trained values)."""
        if self.tokenizer is None:
            raise ConfigError(f"add_mask_token needs the model's tokenizer: {self.cfg.init} has none")
        mcfg = self.model.config
        if self.tokenizer.vocab_size != mcfg.vocab_size:
            raise ConfigError(f"add_mask_token: the tokenizer has {self.tokenizer.vocab_size} tokens but the model "
                              f"{mcfg.vocab_size} rows; the new token's id would not be its row")
        mask = self.tokenizer.add_mask_token()
        row = self.model.add_vocab_rows(1)
        if mask != row:
            raise ConfigError(f"add_mask_token: the tokenizer gave the MASK id {mask}, the model's new row is {row}")
        mcfg.mask_token_id = mask

    def _load_init_adapter(self, name: str) -> None:
        """Start the LoRA from a trained adapter (`init_adapter`): its weights, fp32, into the fresh adapter;
        its rank and alpha must be the config's (a different rank is another run, not more training)."""
        from idlm.layers.lora import LoRAAdapter
        from idlm.models.loader import resolve_model_path

        loaded = LoRAAdapter.load(resolve_model_path(name), self.model.config, device=self.device)
        mine, theirs = self.adapter.config, loaded.config
        for field_, a, b in (("lora_rank", mine.rank, theirs.rank), ("lora_alpha", mine.alpha, theirs.alpha),
                             ("targets", tuple(mine.targets), tuple(theirs.targets))):
            if a != b:
                raise ConfigError(f"init_adapter {name!r} has {field_}={b!r} but this run's is {a!r}")
        self.adapter.load_state_dict(loaded.state_dict())

    def _build_model(self):
        from idlm.models.config import ModelConfig
        from idlm.models.loader import load_pretrained
        from idlm.models.transformer import Transformer
        from idlm.tokenizer import Tokenizer

        cfg = self.cfg
        if cfg.init is not None:
            model, tok = load_pretrained(cfg.init, dtype=torch.float32, device=self.device)
            return model.train(), tok
        tok = Tokenizer.from_dir(cfg.tokenizer or Path(cfg.data) / "tokenizer")
        fields = dict(cfg.model)
        fields.setdefault("family", "qwen3")
        fields.setdefault("qk_norm", fields["family"] == "qwen3")
        fields.setdefault("max_position_embeddings", max(2048, cfg.seq_len))
        fields.update(vocab_size=tok.vocab_size, mask_token_id=tok.mask_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        try:
            mcfg = ModelConfig(**fields)
        except TypeError as e:
            raise ConfigError(f"model section: {e}") from None
        model = Transformer(mcfg).init_weights(std=0.02, seed=cfg.seed).to(self.device)
        return model.train(), tok

    # ------------------------------------------------------------------------------------ data
    def _batches(self, start_step: int):
        """Global step -> this rank's (tokens, lossmask) batches, epoch after epoch."""
        step = start_step
        while True:
            epoch, within = divmod(step, self.batches_per_epoch)
            it = self.train_data.batches(self.per_rank, seed=self.cfg.seed, epoch=epoch, start_step=within,
                                         rank=self.rank, world_size=self.world)
            for batch in it:
                yield batch
                step += 1
                if step % self.batches_per_epoch == 0:
                    break

    def _autocast(self):
        if self.device.type == "cuda" and self.cfg.dtype == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    # ----------------------------------------------------------------------------------- train
    def train(self, resume: bool = False) -> dict:
        cfg = self.cfg
        if resume:
            self.load_checkpoint()
        elif self.rank == 0 and (self.out / "checkpoints").exists() and any(
                not p.name.startswith(".") for p in (self.out / "checkpoints").iterdir()):  # leftovers do not count
            raise ConfigError(f"{self.out} already holds checkpoints: pass --resume to continue, or another 'out'")
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=self.rank != 0, dynamic_ncols=True,
                   desc=f"{cfg.kind}")
        data = self._batches(self.step)
        t_last, tokens_since, last = time.perf_counter(), 0, {}
        t_start = t_last
        stopped = False
        while self.step < cfg.max_steps:
            reason = None
            if cfg.stop_at_step is not None and self.step >= cfg.stop_at_step:  # the same on every rank
                reason = f"stop_at_step {cfg.stop_at_step}"
            elif cfg.max_time_s is not None and self._all_ranks_any(time.perf_counter() - t_start > cfg.max_time_s):
                reason = f"max_time_s {cfg.max_time_s}"
            if reason:
                self._log({"step": self.step, "stopped_early": True, "reason": reason})
                self.save_checkpoint()
                stopped = True
                break
            stride = cfg.stride_at(self.step)
            tokens, lossmask = next(data)
            tokens, lossmask = tokens.to(self.device, non_blocking=True), lossmask.to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            n_micro = self.per_rank // self.micro
            for i in range(n_micro):
                sl = slice(i * self.micro, (i + 1) * self.micro)
                sync = nullcontext() if (self.world == 1 or i == n_micro - 1) else self.module.no_sync()
                with sync, self._autocast():
                    out = self.module(tokens[sl], lossmask[sl], stride, self.generator)
                    (out["loss"] / n_micro).backward()
                for k, v in out.items():
                    if k != "targets":
                        sums[k] = sums.get(k, 0.0) + float(v.detach()) / n_micro
            params = [p for p in self.objective.parameters() if p.requires_grad]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            tokens_since += tokens.numel() * self.world
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                sums = self._mean_over_ranks(sums)
                now = time.perf_counter()
                last = {"step": self.step, **{k: round(v, 5) for k, v in sums.items()},
                        "grad_norm": round(grad_norm, 4), "lr": self.scheduler.get_last_lr()[0], "stride": stride,
                        "tokens_per_s": round(tokens_since / max(now - t_last, 1e-9))}
                t_last, tokens_since = now, 0
                self._log(last)
                bar.set_postfix(loss=f"{sums['loss']:.4f}", tok_s=last["tokens_per_s"])
            if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                self._log({"step": self.step, **self.evaluate()})
            if self.step % cfg.save_every == 0 or self.step == cfg.max_steps:
                self.save_checkpoint()
            bar.update(1)
        bar.close()
        if self.rank == 0:
            if not stopped:  # final/ is a finished run's; a paused run resumes from its checkpoint
                self.save_final()
            self.plot()
        return {**last, "step": self.step, "stopped_early": True} if stopped else last

    def _all_ranks_any(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank: a decision every rank must take together (stopping at
        max_time_s: a rank that stopped alone would leave the others waiting in their next all-reduce)."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def _mean_over_ranks(self, sums: dict[str, float]) -> dict[str, float]:
        """The logged losses averaged over the ranks (each rank saw its own part of the global batch)."""
        if self.world == 1 or not sums:
            return sums
        t = torch.tensor(list(sums.values()), dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(sums, t.tolist())}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out losses over `eval_batches` fixed windows (rank 0's view; the same on every rank)."""
        cfg = self.cfg
        self.objective.eval()
        n = min(cfg.eval_batches * self.micro, self.heldout.num_windows)
        sums: dict[str, float] = {}
        g = torch.Generator().manual_seed(1234)
        count = 0
        for start in range(0, n, self.micro):
            items = [self.heldout.window(i) for i in range(start, min(n, start + self.micro))]
            tokens = torch.stack([t for t, _ in items]).to(self.device)
            lossmask = torch.stack([m for _, m in items]).to(self.device)
            with self._autocast():
                res = {"eval_clean": ar_loss(self.model, tokens, lossmask)["loss"]}
                if cfg.kind != "pretrain":
                    out = self.objective(tokens, lossmask, cfg.stride_at(max(0, self.step - 1)), g)
                    res["eval_noisy"] = out.get("l_noisy", out["loss"])
                    if "l_tv" in out:  # tv_weight: the drafts' held-out rejection rate at tv_temperature
                        res["eval_tv"] = out["l_tv"]
            for k, v in res.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            count += 1
        self.objective.train()
        return {k: round(v / max(count, 1), 5) for k, v in sums.items()}

    def _log(self, record: dict) -> None:
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # ----------------------------------------------------------------------------- checkpoints
    def _trained_module(self):
        return self.adapter if self.adapter is not None else self.model

    def _save_weights(self, path: Path) -> None:
        from idlm.models.loader import save_pretrained

        if self.adapter is not None:
            self.adapter.save(path)
        else:
            save_pretrained(self.model, path, tokenizer=self.tokenizer)

    def save_checkpoint(self) -> Path | None:
        """checkpoints/step-N/{weights, trainer_state.pt}, made complete before it appears."""
        if self.rank != 0:
            return None
        ckdir = ensure_dir(self.out / "checkpoints")
        sweep_checkpoint_leftovers(ckdir)
        final = ckdir / f"step-{self.step:07d}"
        with atomic_dir(final) as tmp:
            self._save_weights(tmp / "weights")
            state = {"step": self.step, "fingerprint": self.cfg.fingerprint(), "config": self.cfg.to_dict(),
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "rng_torch": torch.get_rng_state(), "rng_objective": self.generator.get_state(),
                     "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
            torch.save(state, tmp / "trainer_state.pt")
        # the pointer moves only once the checkpoint is complete and durable (atomic_dir fsynced it)
        atomic_write_text(ckdir / "latest", final.name)
        done = sorted(p for p in ckdir.glob("step-*") if p.is_dir())
        for old in done[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self) -> None:
        ckdir = self.out / "checkpoints"
        latest = ckdir / "latest"
        if not latest.exists():
            raise CheckpointError(f"nothing to resume: {latest} does not exist")
        path = ckdir / latest.read_text().strip()
        state_file = path / "trainer_state.pt"
        try:
            state = torch.load(state_file, map_location="cpu", weights_only=False)
        except (OSError, RuntimeError, EOFError) as e:
            raise CheckpointError(f"cannot read {state_file}: {e}") from None
        if state.get("fingerprint") != self.cfg.fingerprint():
            theirs, ours = state.get("config", {}), self.cfg.to_dict()
            diff = [k for k in ours if k not in NOT_FINGERPRINTED and theirs.get(k) != ours[k]]
            raise CheckpointError(f"{path} was written by a different config (differs in: {', '.join(diff) or '?'}); "
                                  f"refusing to resume")
        from idlm.models.loader import load_weights

        if self.adapter is not None:
            from idlm.layers.lora import LoRAAdapter

            loaded = LoRAAdapter.load(path / "weights", self.model.config, device=self.device)
            self.adapter.load_state_dict(loaded.state_dict())
        else:
            load_weights(self.model, path / "weights")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_torch"])
        self.generator.set_state(state["rng_objective"])
        if state.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.step = state["step"]

    def save_final(self) -> Path:
        """The trained model (or adapter) at out/final, loadable by every idlm command."""
        final = self.out / "final"
        self._save_weights(final)
        return final

    def plot(self) -> Path | None:
        """loss.png from metrics.jsonl (skipped, with a note, if matplotlib is missing)."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no loss plot")
            return None
        rows = list(read_jsonl(self.out / "metrics.jsonl"))
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in ("loss", "l_noisy", "l_clean", "l_soft", "l_tv", "eval_clean", "eval_noisy", "eval_tv"):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=key, marker="o" if key.startswith("eval") else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"idlm train {self.cfg.kind}")
        ax.legend()
        ax.grid(alpha=0.3)
        path = self.out / "loss.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return path
