"""One YAML file per training run, parsed into a validated `TrainConfig`.

Unknown keys are rejected by name (with the closest known key suggested), so a typo never silently
falls back to a default. `fingerprint()` is what a resumed run must share with its checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idlm.errors import ConfigError

KINDS = ("pretrain", "convert", "lora", "sdar")
# Fields that do not change a run's trajectory: a resumed run may differ in them.
NOT_FINGERPRINTED = ("out", "log_every", "eval_every", "eval_batches", "save_every", "keep_checkpoints", "max_time_s",
                     "stop_at_step")


def _number(cfg, name: str, low: float, high: float, low_open: bool = False) -> float:
    """cfg.<name> checked to be a number (not a bool) in [low, high] ((low, high] with low_open); returned."""
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (low < v if low_open else low <= v) or v > high:
        raise ConfigError(f"{name} must be a number in {'(' if low_open else '['}{low:g}, {high:g}], got {v!r}")
    return v


@dataclass
class TrainConfig:
    kind: str  # pretrain | convert | lora | sdar
    data: str  # dataset directory (idlm.data.shards)
    out: str  # run directory: checkpoints/, metrics.jsonl, loss.png, final/
    init: str | None = None  # model to start from (convert/lora/sdar; pretrain: None = random init)
    model: dict[str, Any] | None = None  # pretrain: ModelConfig fields (vocab size taken from the tokenizer)
    tokenizer: str | None = None  # pretrain: tokenizer directory (default: <data>/tokenizer)
    seq_len: int = 512
    batch_size: int = 32  # sequences per optimizer step, over all ranks
    micro_batch_size: int | None = None  # per rank per forward (gradient accumulation); default = batch/world
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int | None = None  # default: 3% of max_steps
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "bf16"  # autocast dtype on CUDA (CPU runs in fp32)
    compile: bool = False  # torch.compile the model (CUDA)
    attention: str = "auto"  # auto | flex | sdpa (diffusion objectives)
    clean_loss_scale: float | str = "auto"  # convert: s in L_noisy + s·L_clean; "auto" = stopgrad(L_noisy/L_clean)
    curriculum: list[list[float]] = field(default_factory=lambda: [[1.0, 4]])  # [[until_fraction, stride N], ...]
    lora_rank: int = 32
    lora_alpha: float = 32.0
    # lora: start from this adapter's weights (a registry name or an adapter directory) instead of a fresh
    # init — more training for a shipped drafter across runs (its rank and alpha must be lora_rank/_alpha)
    init_adapter: str | None = None
    # convert/sdar from a model without a MASK token (e.g. SmolLM2): add one (a new vocabulary row, mean-initialised)
    add_mask_token: bool = False
    # lora / convert: weight w of the soft targets, (1 − w)·CE(response token) + w·CE(p), 0..1; p = the frozen
    # base's distribution (lora) or the model's own clean-half distribution, detached (convert)
    distill_weight: float = 0.0
    # convert: weight w of the clean half's soft targets, (1 − w)·CE(token) + w·CE(p0), p0 the *unchanged* init
    # model's distribution (a frozen copy): the converted model's own AR distribution stays the original's
    clean_distill_weight: float = 0.0
    # lora / convert: weight t of the draft's rejection rate, each MASK row's loss (1 − t)·(its CE) + t·TV(p̃, q̃)
    # at tv_temperature, p̃ the same teacher as distill_weight's: cross-entropy fits a draft that cannot see the
    # token before it to the marginal, TV to the best such draft (docs/training.md, "The ceiling")
    tv_weight: float = 0.0
    tv_temperature: float = 1.0
    # lora: weight γ^j for the MASK at draft position j (0 < γ <= 1; 1 = every position alike)
    position_decay: float = 1.0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    save_every: int = 200
    keep_checkpoints: int = 2
    max_time_s: float | None = None  # wall-clock guard: past it, save a checkpoint and stop (logged)
    stop_at_step: int | None = None  # pause at this step with a checkpoint (a later --resume continues the run)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for name in ("seq_len", "batch_size", "max_steps", "log_every", "eval_every", "eval_batches",
                     "save_every", "keep_checkpoints", "lora_rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        k = self.stop_at_step
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k < self.max_steps):
            raise ConfigError(f"stop_at_step must be an integer in 1..max_steps-1 ({self.max_steps - 1}), got {k!r}")
        mb = self.micro_batch_size
        if mb is not None and (not isinstance(mb, int) or mb < 1):
            raise ConfigError(f"micro_batch_size must be a positive integer, got {self.micro_batch_size!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.warmup_steps is None:
            self.warmup_steps = max(1, round(0.03 * self.max_steps))
        if self.dtype not in ("bf16", "fp32"):
            raise ConfigError(f"dtype must be bf16 or fp32, got {self.dtype!r}")
        if self.attention not in ("auto", "flex", "sdpa"):
            raise ConfigError(f"attention must be auto, flex or sdpa, got {self.attention!r}")
        if not (self.clean_loss_scale == "auto" or isinstance(self.clean_loss_scale, (int, float))):
            raise ConfigError(f"clean_loss_scale must be a number or 'auto', got {self.clean_loss_scale!r}")
        w, c = _number(self, "distill_weight", 0, 1), _number(self, "clean_distill_weight", 0, 1)
        if c and (self.kind != "convert" or self.init is None):
            raise ConfigError(f"clean_distill_weight is for kind convert from a pretrained model (init: the frozen "
                              f"teacher), got kind {self.kind!r} with init {self.init!r}")
        t = _number(self, "tv_weight", 0, 1)
        _number(self, "tv_temperature", 0, 10, low_open=True)
        if t and self.kind not in ("lora", "convert"):
            raise ConfigError(f"tv_weight is for kinds lora and convert (the drafts' teacher is the same as "
                              f"distill_weight's), not {self.kind!r}")
        g = _number(self, "position_decay", 0, 1, low_open=True)
        if g != 1 and self.kind != "lora":
            raise ConfigError(f"position_decay is for kind lora (the drafter's positions), not {self.kind!r}")
        if self.add_mask_token and self.kind not in ("convert", "sdar"):
            raise ConfigError(f"add_mask_token is for kinds convert and sdar, not {self.kind!r}")
        if w and self.kind not in ("lora", "convert"):
            raise ConfigError(f"distill_weight is for kinds lora (the frozen base is the teacher) and convert (the "
                              f"model's own clean rows are), not {self.kind!r}")
        if self.init_adapter is not None and (self.kind != "lora" or not isinstance(self.init_adapter, str)
                                              or not self.init_adapter.strip()):
            raise ConfigError(f"init_adapter (an adapter to start from: a registry name or a directory) is for kind "
                              f"lora, got {self.init_adapter!r} with kind {self.kind!r}")
        self.betas = tuple(self.betas)
        self.curriculum = [list(c) for c in self.curriculum]
        last = 0.0
        for c in self.curriculum:
            if len(c) != 2 or not last < c[0] <= 1 or int(c[1]) != c[1] or c[1] < 2:
                raise ConfigError(f"curriculum entries are [until_fraction, stride >= 2] with increasing "
                                  f"fractions in (0, 1]; got {self.curriculum!r}")
            last = c[0]
        if self.curriculum[-1][0] != 1.0:
            raise ConfigError(f"the last curriculum entry must run until 1.0; got {self.curriculum!r}")
        if self.kind == "pretrain" and self.init is None and not self.model:
            raise ConfigError("pretrain from scratch needs a 'model' section (ModelConfig fields)")
        if self.kind != "pretrain" and self.init is None:
            raise ConfigError(f"kind {self.kind} needs 'init': the model to start from")

    def stride_at(self, step: int) -> int:
        """The stride N of the curriculum at an optimizer step (block = N−1 MASKs)."""
        frac = step / self.max_steps
        for until, n in self.curriculum:
            if frac < until:
                return int(n)
        return int(self.curriculum[-1][1])

    def fingerprint(self) -> str:
        """Hash of everything that defines the run's trajectory (not where it is written)."""
        d = dataclasses.asdict(self)
        for k in NOT_FINGERPRINTED:
            d.pop(k)
        # how the step runs, not what it computes: a compiled run resumes eagerly (and the other way round) when
        # the compiler fails on a machine; kept in the dict at False so runs before this keep their fingerprint
        d["compile"] = False
        later = (("distill_weight", 0), ("add_mask_token", False), ("position_decay", 1), ("init_adapter", None),
                 ("clean_distill_weight", 0), ("tv_weight", 0), ("tv_temperature", 1))
        for key, default in later:  # options added later: at their defaults, runs keep their old fingerprint
            if d[key] == default:
                d.pop(key)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "TrainConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a mapping of keys to values")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{source}: unknown key {key!r}{hint}")
        for key in ("kind", "data", "out"):
            if key not in d:
                raise ConfigError(f"{source}: missing required key {key!r}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | Path, defaults: dict | None = None, **overrides) -> "TrainConfig":
        import yaml

        try:
            d = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        d = dict(d or {})
        for k, v in (defaults or {}).items():
            d.setdefault(k, v)
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d
