"""The working tree that travels to the GPU machine: at most 64 MiB of tracked and untracked-not-ignored
files plus the carried paths, and the embedded assets alone are ~79 MiB. This leaves the assets a run
does not need behind (untracked and ignored for the calls) and brings them back afterwards; the recorded
runs under docs/runs stay behind on every slim (no device stage reads them), all but the files at the top
of docs/runs/risd (its held-out prompts are what the SmolLM2 measurements run on).

    python scripts/device_tree.py size                        what would travel now, in MiB
    python scripts/device_tree.py slim                        leave the optional assets behind (the SmolLM2 adapter)
    python scripts/device_tree.py slim --keep none            leave every asset behind (the GGUF-carrying calls)
    python scripts/device_tree.py slim --keep idlm-tiny       keep only the named assets (comma-separated)
    python scripts/device_tree.py restore                     track every asset again (do it before committing)

`slim` runs `git rm -r --cached` on the left-behind asset and record folders and lists them in .git/info/exclude;
`restore` undoes both. Nothing in the files changes. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from idlm.models.registry import OPTIONAL_EMBEDDED  # noqa: E402  (assets known only where present)

ASSETS = "idlm/assets"
EXCLUDE = REPO / ".git" / "info" / "exclude"
BEGIN, END = "# device_tree.py: assets left behind", "# device_tree.py: end"
LIMIT_MIB = 64
RUNS = "docs/runs"
KEPT_RUNS = "docs/runs/risd"  # its top-level files travel (heldout_prompts.jsonl.gz), its folders do not


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout


def records() -> list[str]:
    """The folders of recorded runs that stay behind: every one under docs/runs but docs/runs/risd itself,
    whose own folders stay behind instead (repository-relative, sorted)."""
    out = []
    for parent in (RUNS, KEPT_RUNS):
        if (REPO / parent).is_dir():
            out += [f"{parent}/{p.name}" for p in (REPO / parent).iterdir() if p.is_dir()]
    return sorted(r for r in out if r != KEPT_RUNS)


def travelling_mib(leave: tuple[str, ...] = (), leave_records: bool = False) -> float:
    """Tracked + untracked-not-ignored files (what a device call sends without carry), in MiB; `leave`:
    asset names to count as left behind; leave_records: the record folders too (what `slim` sends)."""
    names = git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    left = tuple(f"{ASSETS}/{a}/" for a in leave) + tuple(f"{r}/" for r in (records() if leave_records else ()))
    total = sum((REPO / n).stat().st_size for n in names if n and not n.startswith(left) and (REPO / n).is_file())
    return round(total / 2**20, 2)


def assets() -> list[str]:
    return sorted(p.name for p in (REPO / ASSETS).iterdir() if p.is_dir())


def restore() -> list[str]:
    lines = EXCLUDE.read_text().splitlines() if EXCLUDE.exists() else []
    kept, left, inside = [], [], False
    for ln in lines:
        if ln == BEGIN:
            inside = True
        elif ln == END:
            inside = False
        elif inside:
            left.append(ln.strip("/"))
        else:
            kept.append(ln)
    EXCLUDE.write_text("".join(ln + "\n" for ln in kept))
    for path in left:
        git("add", "--", path)
    return [Path(p).name for p in left if p.startswith(ASSETS + "/")]


def slim(keep: list[str]) -> list[str]:
    restore()  # from a clean state: slimming twice does not stack
    leave = [a for a in assets() if a not in keep]
    paths = [f"{ASSETS}/{a}" for a in leave] + records()
    for path in paths:
        git("rm", "-r", "-q", "--cached", "--ignore-unmatch", "--", path)
    with open(EXCLUDE, "a") as f:
        f.write("\n".join([BEGIN, *(f"/{p}/" for p in paths), END]) + "\n")
    return leave


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["size", "slim", "restore"])
    ap.add_argument("--keep", default=None, help="slim: the assets that travel (comma-separated, or 'none'); default: "
                                                  "every one but the optional ones (registry.OPTIONAL_EMBEDDED)")
    args = ap.parse_args()
    out: dict = {}
    if args.action == "slim":
        if args.keep is None:
            keep = [a for a in assets() if a not in OPTIONAL_EMBEDDED]
        else:
            keep = [] if args.keep == "none" else args.keep.split(",")
            unknown = sorted(set(keep) - set(assets()))
            if unknown:
                raise SystemExit(f"--keep names no asset {unknown}: the assets are {assets()}")
        out["left_behind"] = slim(keep)
    elif args.action == "restore":
        out["restored"] = restore()
    out["travelling_mib"] = travelling_mib()
    out["fits"] = out["travelling_mib"] <= LIMIT_MIB
    print(json.dumps(out))


if __name__ == "__main__":
    main()
