"""The working tree that travels to the GPU machine: at most 64 MiB of tracked and untracked-not-ignored
files plus the carried paths, and the embedded assets alone are ~79 MiB. This leaves the assets a run
does not need behind (untracked and ignored for the calls) and brings them back afterwards.

    python scripts/device_tree.py size                        what would travel now, in MiB
    python scripts/device_tree.py slim                        leave the optional assets behind (the SmolLM2 adapter)
    python scripts/device_tree.py slim --keep none            leave every asset behind (the GGUF-carrying calls)
    python scripts/device_tree.py slim --keep idlm-tiny       keep only the named assets (comma-separated)
    python scripts/device_tree.py restore                     track every asset again (do it before committing)

`slim` runs `git rm -r --cached` on the left-behind asset folders and lists them in .git/info/exclude;
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


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout


def travelling_mib(leave: tuple[str, ...] = ()) -> float:
    """Tracked + untracked-not-ignored files (what a device call sends without carry), in MiB; `leave`:
    asset names to count as left behind."""
    names = git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    left = tuple(f"{ASSETS}/{a}/" for a in leave)
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
    return [Path(p).name for p in left]


def slim(keep: list[str]) -> list[str]:
    restore()  # from a clean state: slimming twice does not stack
    leave = [a for a in assets() if a not in keep]
    for a in leave:
        git("rm", "-r", "-q", "--cached", "--", f"{ASSETS}/{a}")
    with open(EXCLUDE, "a") as f:
        f.write("\n".join([BEGIN, *(f"/{ASSETS}/{a}/" for a in leave), END]) + "\n")
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
