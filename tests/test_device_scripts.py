"""The GPU-run plumbing that must not lose anything: scripts/device_tree.py leaves assets out of what travels
and brings them back exactly (in a scratch git repository), and scripts/smollm2_risd.py's pack / unpack
round-trip the distilled data byte for byte and refuse a corrupt piece."""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return mod


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A git repository with two committed assets (1 MiB and 2 MiB) and a source file."""
    repo = tmp_path / "repo"
    for name, size in (("small", 1 << 20), ("big", 2 << 20)):
        (repo / "idlm/assets" / name).mkdir(parents=True)
        (repo / "idlm/assets" / name / "w.bin").write_bytes(b"x" * size)
    (repo / "code.py").write_text("print(1)\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    (repo / ".git/info").mkdir(exist_ok=True)
    (repo / ".git/info/exclude").write_text("# a line of the user's\n")
    dt = _load("device_tree")
    monkeypatch.setattr(dt, "REPO", repo)
    monkeypatch.setattr(dt, "EXCLUDE", repo / ".git/info/exclude")
    return dt, repo


def test_slim_leaves_assets_behind_and_restore_brings_them_back(scratch):
    dt, repo = scratch
    full = dt.travelling_mib()
    assert full == pytest.approx(3.0, abs=0.01)
    assert dt.slim(["small"]) == ["big"]
    assert dt.travelling_mib() == pytest.approx(1.0, abs=0.01)
    assert (repo / "idlm/assets/big/w.bin").stat().st_size == 2 << 20  # the files stay where they are
    assert dt.slim([]) == ["big", "small"]  # slimming again starts from the full tree, it does not stack
    assert dt.travelling_mib() < 0.01
    assert sorted(dt.restore()) == ["big", "small"]
    assert dt.travelling_mib() == full
    assert _git(repo, "status", "--porcelain") == ""  # exactly the committed tree again
    assert (repo / ".git/info/exclude").read_text() == "# a line of the user's\n"


@pytest.fixture
def smol(tmp_path, monkeypatch):
    mod = _load("smollm2_risd")
    state, out, repo = tmp_path / "state", tmp_path / "out", tmp_path / "repo"
    (state / "distill" / "parts").mkdir(parents=True)
    out.mkdir()
    (state / "distill" / "train.tokens.bin").write_bytes(random.Random(0).randbytes(5000))  # incompressible
    (state / "distill" / "meta.json").write_text(json.dumps({"format": "x"}))
    (state / "distill" / "parts" / "engine0.jsonl").write_text("resume state\n")
    (state / "text" / "tokenizer").mkdir(parents=True)
    (state / "text" / "train.tokens.bin").write_bytes(random.Random(1).randbytes(3000))
    (state / "text" / "meta.json").write_text(json.dumps({"tokenizer": "tokenizer"}))
    (state / "text" / "tokenizer" / "tokenizer.json").write_text('{"model": {}}')
    monkeypatch.setattr(mod, "STATE", state)
    monkeypatch.setattr(mod, "OUT", str(out))
    monkeypatch.setattr(mod, "REPO", repo)
    monkeypatch.setattr(mod, "PIECE", 1000)  # several pieces from a small tarball
    return mod, state, out, repo


@pytest.mark.parametrize("what", ["distill", "text"])
def test_pack_and_unpack_round_trip_the_data(smol, what):
    """The distilled data, and issue 15's general text (built on a CPU, carried to the GPU machine)."""
    mod, state, out, repo = smol
    args = argparse.Namespace(what=what)
    mod.stage_pack(args)
    packed = json.loads((out / "pack.json").read_text())
    assert len(packed["pieces"]) > 1 and packed["what"] == what
    carry = repo / ".carry" / what
    carry.mkdir(parents=True)
    for name in [*packed["pieces"], "pack.json"]:
        (carry / name).write_bytes((out / name).read_bytes())
    original = {str(f.relative_to(state / what)): f.read_bytes() for f in (state / what).rglob("*")
                if f.is_file() and f.parent.name != "parts"}
    mod.stage_unpack(args)
    restored = {str(f.relative_to(state / what)): f.read_bytes() for f in (state / what).rglob("*") if f.is_file()}
    assert restored == original  # byte for byte with the tokenizer folder; the resume-only parts/ stayed behind
    if what == "text":  # a text pack in the distilled data's carry folder is refused by name
        other = repo / ".carry" / "distill"
        other.mkdir(parents=True)
        for name in [*packed["pieces"], "pack.json"]:
            (other / name).write_bytes((carry / name).read_bytes())
        with pytest.raises(SystemExit, match="'text' data, not 'distill'"):
            mod.stage_unpack(argparse.Namespace(what="distill"))


def test_unpack_refuses_data_whose_tokenizer_the_pack_left_out(smol):
    """Packs of the first `pack` held the top-level files only: the distilled data came back without the
    tokenizer/ folder that `idlm data mix` and the trainer read. Such a pack is refused by name, nothing
    replaced, rather than failing later on the GPU machine."""
    import tarfile

    mod, state, out, repo = smol
    carry = repo / ".carry" / "text"
    carry.mkdir(parents=True)
    with tarfile.open(carry / "text.tar.xz.0", "w:xz") as tar:  # an old pack: no tokenizer/ inside
        for name in ("meta.json", "train.tokens.bin"):
            tar.add(state / "text" / name, arcname=f"text/{name}")
    data = (carry / "text.tar.xz.0").read_bytes()
    import hashlib

    (carry / "pack.json").write_text(json.dumps({"what": "text", "pieces": ["text.tar.xz.0"],
                                                 "sha256": hashlib.sha256(data).hexdigest()}))
    before = sorted(p.name for p in (state / "text").iterdir())
    with pytest.raises(SystemExit, match="tokenizer/tokenizer.json"):
        mod.stage_unpack(argparse.Namespace(what="text"))
    assert sorted(p.name for p in (state / "text").iterdir()) == before
    assert not (state / "text.unpacking").exists()


def test_unpack_refuses_a_corrupt_piece(smol):
    mod, state, out, repo = smol
    mod.stage_pack(argparse.Namespace(what="distill"))
    packed = json.loads((out / "pack.json").read_text())
    carry = repo / ".carry" / "distill"
    carry.mkdir(parents=True)
    for name in [*packed["pieces"], "pack.json"]:
        (carry / name).write_bytes((out / name).read_bytes())
    bad = carry / packed["pieces"][0]
    bad.write_bytes(b"\0" + bad.read_bytes()[1:])
    before = sorted(p.name for p in (state / "distill").iterdir())
    with pytest.raises(SystemExit, match="sha256"):
        mod.stage_unpack(argparse.Namespace(what="distill"))
    assert sorted(p.name for p in (state / "distill").iterdir()) == before  # nothing replaced


def test_the_default_slim_tree_fits_the_device():
    """What `device_tree.py slim` sends by default (every tracked file but the optional embedded assets) fits
    the GPU machine's 64 MiB, so the tiny models' GPU runs need no further slimming; a repository that has
    grown past it must leave more behind (`--keep`) or shrink."""
    dt = _load("device_tree")
    assert dt.travelling_mib(leave=dt.OPTIONAL_EMBEDDED, leave_records=True) <= 64


def test_slim_leaves_the_recorded_runs_behind_but_the_heldout_prompts(scratch):
    """Every slim leaves docs/runs' folders behind (no device stage reads them; they grow every session), all
    but the files at the top of docs/runs/risd, which the SmolLM2 measurements read on the device."""
    dt, repo = scratch
    for rel, size in (("docs/runs/stride/a.json", 1 << 20), ("docs/runs/risd/session9/b.json", 1 << 20),
                      ("docs/runs/risd/heldout_prompts.jsonl.gz", 1 << 10)):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_bytes(b"y" * size)
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "runs")
    assert dt.records() == ["docs/runs/risd/session9", "docs/runs/stride"]
    assert dt.travelling_mib(leave_records=True) == pytest.approx(3.0, abs=0.01)
    assert dt.slim(["big", "small"]) == []
    tracked = _git(repo, "ls-files").split()
    assert "docs/runs/risd/heldout_prompts.jsonl.gz" in tracked
    assert not [t for t in tracked if t.startswith(("docs/runs/stride/", "docs/runs/risd/session9/"))]
    assert dt.travelling_mib() == pytest.approx(3.0, abs=0.01)
    assert dt.restore() == []  # no asset was left behind; the records come back all the same
    assert _git(repo, "status", "--porcelain") == ""
    assert (repo / ".git/info/exclude").read_text() == "# a line of the user's\n"


def test_convert_eval_runs_the_asked_parts_and_stops_at_its_budget(tmp_path, monkeypatch):
    """scripts/smollm2_convert.py's eval: --parts / --models pick the measurements, the α runs are the issue's
    (α at N = 4 for T = 1 and 0.7, TPF at N = 2/3/4/8 greedy and T = 0.7, the ablation at N = 4) over the first
    --alpha-prompts held-out prompts, the adaptive stride's speed only with --auto-speed, --jobs runs the
    untimed commands in parallel but the timed ones last and alone, and --budget starts no command once spent
    (listed as skipped), so a later call can run the rest; an unknown part or model is refused by name."""
    import threading

    mod = _load("smollm2_convert")
    calls, running, overlap = [], [0], [0]
    lock = threading.Lock()

    def fake_idlm(*cmd, **kw):
        with lock:
            calls.append(cmd)
            running[0] += 1
            if cmd[0] == "bench":
                overlap[0] = max(overlap[0], running[0])
        import time
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        return 0, '{"ok": 1}\n'

    monkeypatch.setattr(mod, "idlm", fake_idlm)
    monkeypatch.setattr(mod, "STATE", tmp_path)
    (tmp_path / "distill").mkdir()
    (tmp_path / "distill" / "prompts.jsonl").write_text("".join(f'{{"prompt": "p{i}"}}\n' for i in range(10)))
    monkeypatch.setattr(mod, "emit", lambda key, value: mod.results.__setitem__(key, value))
    args = argparse.Namespace(smoke=False, model="smollm2-135m-instruct", parts="alpha,speed", budget=None,
                              auto_speed=False, models="ar,idlm,sdar", jobs=4, alpha_prompts=3,
                              measure_dtype="float32")
    mod.stage_eval(args)
    out = mod.results["eval"]
    alphas = sorted(k for k in out if k.startswith("alpha/"))
    assert len(alphas) == 11 + 3 and "alpha/idlm/N4/T1.0" in alphas and "alpha/sdar/N4/T0.7" in alphas
    assert {"alpha/ar/N4/T1.0", "alpha/ar/N4/T1.0/bf16", "alpha/idlm/N4/T1.0/bf16"} < set(alphas)  # bf16's bias
    assert "alpha/idlm/N8/T0" in alphas and "alpha/idlm/N2/T1.0" not in alphas
    assert sorted(k for k in out if k.startswith("speed/")) == ["speed/ar", "speed/isd4"]
    assert overlap[0] == 1  # a timed run never shares the machine
    assert [c[0] for c in calls][-2:] == ["bench", "bench"]
    assert ["--compare-ar" in c for c in calls[-2:]] == [False, True]  # ISD's run times its own AR beside it
    assert not any(c[:2] == ("eval", "loss") or c[:2] == ("eval", "humaneval") for c in calls)
    prompt_file = calls[0][calls[0].index("--prompts") + 1]
    dtypes = [(c[0], c[c.index("--dtype") + 1]) for c in calls]  # one --dtype each
    assert all(c.count("--dtype") == 1 for c in calls) and dtypes.count(("bench", "bfloat16")) == 2
    assert dtypes.count(("eval", "bfloat16")) == 2 and dtypes.count(("eval", "float32")) == 12  # α in fp32 but two
    assert Path(prompt_file).read_text().splitlines() == [f'{{"prompt": "p{i}"}}' for i in range(3)]
    calls.clear()
    mod.stage_eval(argparse.Namespace(**{**vars(args), "parts": "loss,alpha,humaneval", "models": "sdar"}))
    assert sorted(k for k in mod.results["eval"] if "/" in k and k != "cmd_wall_s") == [
        "alpha/sdar/N4/T0.7", "alpha/sdar/N4/T1.0", "clean_loss/sdar/distill", "clean_loss/sdar/text"]
    calls.clear()
    mod.stage_eval(argparse.Namespace(**{**vars(args), "parts": "alpha,speed", "models": "ar,soft"}))
    keys = sorted(k for k in mod.results["eval"] if "/" in k and k != "cmd_wall_s")
    assert keys == ["alpha/ar/N4/T1.0", "alpha/ar/N4/T1.0/bf16", "alpha/soft/N4/T0", "alpha/soft/N4/T0.7",
                    "alpha/soft/N4/T1.0", "alpha/soft/N4/T1.0/bf16", "speed/ar", "speed/isd4_soft"]
    assert all("idlm_soft" in c[c.index("--model") + 1] for c in calls if c[0] == "eval" and "ar" not in c)
    calls.clear()
    mod.stage_eval(argparse.Namespace(**{**vars(args), "parts": "loss,humaneval", "budget": 0.0}))
    assert calls == [] and len(mod.results["eval"]["skipped"]) == 6 + 2
    with pytest.raises(SystemExit, match="unknown speling"):
        mod.stage_eval(argparse.Namespace(**{**vars(args), "parts": "alpha,speling"}))
    with pytest.raises(SystemExit, match="unknown tiny"):
        mod.stage_eval(argparse.Namespace(**{**vars(args), "models": "ar,tiny"}))


def test_speed_engines_follow_the_flags_and_refuse_unknown_or_contradictory_names():
    mod = _load("smollm2_risd")

    def ns(**kw):
        return argparse.Namespace(**{"speed_engines": "", "branches": False, "no_auto": False, "guesses": 0, **kw})

    assert mod.speed_engines(ns()) == ["ar", "risd", "risd_auto"]
    assert mod.speed_engines(ns(branches=True, no_auto=True)) == ["ar", "risd", "risd_br"]
    assert mod.speed_engines(ns(branches=True, no_auto=True, guesses=1)) == ["ar", "risd", "risd_br", "risd_gs"]
    with pytest.raises(SystemExit, match="--guesses"):
        mod.speed_engines(ns(speed_engines="risd_gs"))
    # named: AR always first, the rest in the stage's order whatever the order given
    assert mod.speed_engines(ns(speed_engines="risd_auto,risd")) == ["ar", "risd", "risd_auto"]
    assert mod.speed_engines(ns(speed_engines="risd_auto")) == ["ar", "risd_auto"]
    with pytest.raises(SystemExit, match="unknown engine"):
        mod.speed_engines(ns(speed_engines="risd,eagle"))
    with pytest.raises(SystemExit, match="--no-auto"):
        mod.speed_engines(ns(speed_engines="risd_auto", no_auto=True))


def test_speed_cells_run_at_least_speed_requests_and_two_waves():
    mod = _load("smollm2_risd")

    def ns(n, smoke=False):
        return argparse.Namespace(speed_requests=n, smoke=smoke)

    assert [mod.speed_requests(ns(32), c) for c in (1, 16, 64)] == [32, 32, 128]
    assert mod.speed_requests(ns(8), 16) == 32
    assert mod.speed_requests(ns(32, smoke=True), 1) == 2  # the CPU smoke run stays small
    with pytest.raises(SystemExit, match="--speed-requests"):
        mod.speed_requests(ns(0), 1)


def test_heldout_prompts_come_from_the_committed_copy_without_distilled_data(tmp_path, monkeypatch):
    mod = _load("smollm2_risd")
    monkeypatch.setattr(mod, "STATE", tmp_path)  # no distill/ here
    msgs = mod.heldout_messages()
    assert len(msgs) == 1179 and all(m and m[-1]["role"] == "user" for m in msgs)
    from idlm.data.chat_prompts import read_prompts

    assert {p["split"] for p in read_prompts(str(mod.HELDOUT))} == {"heldout"}
    # distill's own file wins when there is one
    (tmp_path / "distill").mkdir()
    (tmp_path / "distill" / "prompts.jsonl").write_text('{"prompt": "hi", "split": "heldout"}\n')
    assert mod.heldout_messages() == [[{"role": "user", "content": "hi"}]]
    # ... when its data has seed 0; another seed's held-out set is not the one the numbers were measured on
    (tmp_path / "distill" / "distill.json").write_text(json.dumps({"config": {"seed": 0}}))
    assert mod.heldout_messages() == [[{"role": "user", "content": "hi"}]]
    (tmp_path / "distill" / "distill.json").write_text(json.dumps({"config": {"seed": 1}}))
    assert len(mod.heldout_messages()) == 1179
