"""idlm.atomic: saves are atomic, fsynced before they are renamed into place, and sweep what killed
saves left behind (only that); the trainer's checkpoints directory is swept at every save."""

from __future__ import annotations

import os
import re
import sys

import pytest
from test_training import cfg, data_dir  # noqa: F401  (the tiny dataset fixture and config of the training tests)

from idlm import atomic
from idlm.atomic import atomic_dir, atomic_write_text, sweep_leftovers

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="maps fds to paths via /proc/self/fd")


def save(path, text: str) -> None:
    with atomic_dir(path) as tmp:
        (tmp / "f.txt").write_text(text)


def names(d) -> list[str]:
    return sorted(os.listdir(d))


def leftover(path, text="partial"):
    path.mkdir()
    (path / "f.txt").write_text(text)
    return path


def test_the_next_save_sweeps_leftovers_of_its_own_name_and_nothing_else(tmp_path):
    save(tmp_path / "x", "v1")
    leftover(tmp_path / ".x.tmp-abcd1234")
    leftover(tmp_path / ".x.old-abcd1234", "v0")
    (tmp_path / ".x.tmp-0123abcd").write_text("a temp file")  # files are leftovers too
    keep = [".y.tmp-1", ".xy.tmp-1", ".x.keep", ".y.tmp-abcd1234", ".xy.tmp-abcd1234", ".x.tmp-1",
            ".x.tmp-ABCD1234", ".x.tmp-abcd12345", ".x.old-abcd123", "x.tmp-abcd1234", ".x.tmp-abcd1234.keep"]
    for n in keep:
        (tmp_path / n).mkdir()
    save(tmp_path / "x", "v2")
    assert names(tmp_path) == sorted(keep + ["x"])
    assert (tmp_path / "x" / "f.txt").read_text() == "v2"


def test_a_live_save_holding_its_temp_dir_is_not_swept(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    live = leftover(tmp_path / ".x.tmp-abcd1234")
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a concurrent atomic_dir holds while it writes
        save(tmp_path / "x", "v1")
        assert live.is_dir() and (live / "f.txt").read_text() == "partial"
    finally:
        os.close(fd)
    save(tmp_path / "x", "v2")  # once that writer is gone its directory is a leftover
    assert names(tmp_path) == ["x"]


def test_the_current_save_never_sweeps_its_own_temp_dir(tmp_path):
    with atomic_dir(tmp_path / "x") as tmp:
        (tmp / "f.txt").write_text("mine")
        assert sweep_leftovers(tmp_path, "x") == []  # e.g. a concurrent save of the same name
        assert tmp.is_dir()
    assert (tmp_path / "x" / "f.txt").read_text() == "mine" and names(tmp_path) == ["x"]


def test_a_failed_save_leaves_the_previous_target_and_no_temp_dir(tmp_path):
    save(tmp_path / "x", "v1")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(tmp_path / "x") as tmp:
            (tmp / "f.txt").write_text("half")
            raise RuntimeError("boom")
    assert names(tmp_path) == ["x"] and (tmp_path / "x" / "f.txt").read_text() == "v1"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "new") as tmp:
            raise KeyboardInterrupt
    assert names(tmp_path) == ["x"]


def test_a_failure_between_the_two_renames_puts_the_old_target_back(tmp_path, monkeypatch):
    save(tmp_path / "x", "v1")
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the old target is aside, the new one not yet in place
            raise OSError(5, "I/O error")
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="I/O error"):
        save(tmp_path / "x", "v2")
    monkeypatch.undo()
    assert names(tmp_path) == ["x"] and (tmp_path / "x" / "f.txt").read_text() == "v1"


def test_after_a_crash_between_the_two_renames_the_old_copy_is_restored_then_replaced(tmp_path):
    save(tmp_path / "x", "v1")
    os.rename(tmp_path / "x", tmp_path / ".x.old-abcd1234")  # what a kill between the renames leaves
    leftover(tmp_path / ".x.tmp-12345678", "v2")
    assert sweep_leftovers(tmp_path, "x") == [tmp_path / ".x.tmp-12345678"]  # what a reader may call
    assert names(tmp_path) == ["x"] and (tmp_path / "x" / "f.txt").read_text() == "v1"

    os.rename(tmp_path / "x", tmp_path / ".x.old-abcd1234")
    with pytest.raises(RuntimeError):  # the next save restores before writing, so its failure keeps v1
        with atomic_dir(tmp_path / "x"):
            raise RuntimeError
    assert names(tmp_path) == ["x"] and (tmp_path / "x" / "f.txt").read_text() == "v1"

    os.rename(tmp_path / "x", tmp_path / ".x.old-abcd1234")
    save(tmp_path / "x", "v3")
    assert names(tmp_path) == ["x"] and (tmp_path / "x" / "f.txt").read_text() == "v3"


def _record(monkeypatch) -> list[tuple]:
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kw):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        return real_replace(src, dst, **kw)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@linux_only
def test_files_and_directories_are_fsynced_before_the_rename_and_the_parent_after(tmp_path, monkeypatch):
    root = os.path.realpath(tmp_path)
    target = os.path.join(root, "x")
    save(target, "v1")
    events = _record(monkeypatch)
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"b" * 100)
        t = os.path.realpath(tmp)
    synced = [e[1] for e in events if e[0] == "fsync"]
    moved = events.index(("replace", t, target))
    before = [e[1] for e in events[:moved] if e[0] == "fsync"]
    for p in ("a.txt", "sub/b.bin", "sub", ""):
        assert os.path.join(t, p).rstrip("/") in before, p
    assert before.index(os.path.join(t, "sub")) < before.index(t)  # bottom-up: the temp dir itself last
    aside = [e for e in events[:moved] if e[0] == "replace"]
    assert len(aside) == 1 and aside[0][1] == target and re.fullmatch(r"\.x\.old-[0-9a-f]{8}",
                                                                        os.path.basename(aside[0][2]))
    assert ("fsync", root) in events[moved:]  # the renames themselves are made durable
    assert len(synced) >= 5 and names(tmp_path) == ["x"]


@linux_only
def test_atomic_write_text_replaces_atomically_and_fsyncs(tmp_path, monkeypatch):
    root = os.path.realpath(tmp_path)
    p = os.path.join(root, "latest")
    atomic_write_text(p, "step-1")
    (tmp_path / ".latest.tmp-abcd1234").write_text("step-")  # a killed write's leftover
    (tmp_path / ".latest.keep").write_text("mine")
    events = _record(monkeypatch)
    assert atomic_write_text(p, "step-2") == tmp_path / "latest"
    assert (tmp_path / "latest").read_text() == "step-2"
    (replaced,) = [e for e in events if e[0] == "replace"]
    assert replaced[2] == p and re.fullmatch(r"\.latest\.tmp-[0-9a-f]{8}", os.path.basename(replaced[1]))
    i = events.index(replaced)
    assert ("fsync", replaced[1]) in events[:i] and ("fsync", root) in events[i:]
    assert names(tmp_path) == [".latest.keep", "latest"]

    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(p, "step-3")
    assert (tmp_path / "latest").read_text() == "step-2" and names(tmp_path) == [".latest.keep", "latest"]


def test_without_flock_only_old_untouched_leftovers_are_swept(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "fcntl", None)
    fresh = leftover(tmp_path / ".x.tmp-abcd1234")
    stale = leftover(tmp_path / ".x.tmp-0000aaaa")
    old = 1_000_000_000
    for p in (stale, stale / "f.txt"):
        os.utime(p, (old, old))
    save(tmp_path / "x", "v1")
    assert names(tmp_path) == [".x.tmp-abcd1234", "x"] and fresh.is_dir()


# --------------------------------------------------------------------------------------- trainer
def test_sweep_checkpoint_leftovers(tmp_path):
    from idlm.training.trainer import sweep_checkpoint_leftovers

    ck = tmp_path / "checkpoints"
    ck.mkdir()
    save(ck / "step-0000003", "new")  # so the .old copy of step 3 below is obsolete
    for n in ("step-0000002", ".step-0000001.tmp-deadbeef", ".step-0000003.old-deadbeef"):
        leftover(ck / n)
    for n, text in ((".latest.tmp-deadbeef", "step-"), (".latest-abc123", "step-"), ("latest", "step-0000002"),
                    (".latest-notes", "mine"), (".step-0000001.tmp-1", "mine")):
        (ck / n).write_text(text)
    removed = sweep_checkpoint_leftovers(ck)
    assert sorted(p.name for p in removed) == [".latest-abc123", ".latest.tmp-deadbeef",
                                               ".step-0000001.tmp-deadbeef", ".step-0000003.old-deadbeef"]
    assert names(ck) == [".latest-notes", ".step-0000001.tmp-1", "latest", "step-0000002", "step-0000003"]


def test_trainer_save_sweeps_stale_temp_checkpoints(data_dir, tmp_path):  # noqa: F811 (the imported fixture)
    from idlm.training.trainer import Trainer

    def trainer():
        return Trainer(cfg(data_dir, tmp_path / "run", max_steps=2, save_every=1, eval_every=2, keep_checkpoints=3))
    t = trainer()
    t.train()
    ck = tmp_path / "run" / "checkpoints"
    assert names(ck) == ["latest", "step-0000001", "step-0000002"]
    leftover(ck / ".step-0000001.tmp-deadbeef")  # what a run killed mid-save left
    (ck / ".latest-abc123").write_text("step-")
    assert t.save_checkpoint() == ck / "step-0000002"  # re-saving an existing step: the old copy goes aside
    assert names(ck) == ["latest", "step-0000001", "step-0000002"]
    t2 = trainer()
    t2.load_checkpoint()
    assert t2.step == 2
