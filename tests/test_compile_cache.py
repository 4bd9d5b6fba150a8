"""`idlm.engine.compile_cache`: compiled kernels saved to one file and loaded back (torch's portable cache
artifacts), and a bad or missing file costing nothing but the cold compile."""

from __future__ import annotations

import pytest
import torch

from idlm.engine import compile_cache


def _compile_something():
    f = torch.compile(lambda x: (x * 2 + 1).relu().sum(-1), dynamic=False)
    return f(torch.arange(6.0).view(2, 3))


@pytest.mark.parametrize("name", ["cache.bin", "cache.bin.gz"])
def test_save_then_load_round_trip(tmp_path, name):
    assert _compile_something().tolist() == [9.0, 27.0]
    path = tmp_path / name
    saved = compile_cache.save(path)
    assert saved["saved"] and saved["entries"] >= 1 and path.stat().st_size == saved["bytes"] > 0
    assert not list(tmp_path.glob(f".{name}.tmp-*"))  # written atomically: no temporary left
    if name.endswith(".gz"):
        assert path.read_bytes()[:2] == b"\x1f\x8b"  # gzip
    loaded = compile_cache.load(path)
    assert loaded == {"loaded": True, "bytes": saved["bytes"], "entries": saved["entries"], "error": None}


def test_missing_file_loads_nothing_without_error(tmp_path):
    assert compile_cache.load(tmp_path / "none.bin") == {"loaded": False, "bytes": 0, "entries": 0, "error": None}


def test_damaged_file_warns_and_compiles_cold(tmp_path):
    path = tmp_path / "cache.bin"
    path.write_bytes(b"not a cache at all")
    with pytest.warns(UserWarning, match="not loaded"):
        got = compile_cache.load(path)
    assert got["loaded"] is False and got["bytes"] == 18 and got["error"]
    assert _compile_something().tolist() == [9.0, 27.0]  # compiling still works


def test_from_env_loads_now_and_saves_at_exit(tmp_path, monkeypatch):
    hooks = []
    monkeypatch.setattr(compile_cache.atexit, "register", hooks.append)
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    assert compile_cache.from_env() is None and hooks == []
    path = tmp_path / "sub" / "cache.bin"
    monkeypatch.setenv(compile_cache.ENV, str(path))
    monkeypatch.setattr(compile_cache, "_ACTIVE", {})
    assert compile_cache.from_env() == {"loaded": False, "bytes": 0, "entries": 0, "error": None}
    assert compile_cache.from_env() == {"loaded": False, "bytes": 0, "entries": 0, "error": None}
    assert len(hooks) == 1  # set up once per path and process
    _compile_something()
    hooks[0]()  # the exit hook writes what this process compiled
    assert path.is_file() and compile_cache.load(path)["loaded"]


def test_cli_loads_the_cache_of_the_environment_and_goes_on_when_it_is_bad(tmp_path, monkeypatch, capsys):
    from idlm.cli import main

    hooks = []
    monkeypatch.setattr(compile_cache.atexit, "register", hooks.append)
    path = tmp_path / "cache.bin"
    path.write_bytes(b"damaged")
    monkeypatch.setattr(compile_cache, "_ACTIVE", {})
    monkeypatch.setenv(compile_cache.ENV, str(path))
    with pytest.warns(UserWarning, match="not loaded"):
        rc = main(["generate", "Hi", "--model", "idlm-tiny", "--max-tokens", "2", "--device", "cpu"])
    assert rc == 0 and len(hooks) == 1  # the command ran; its compiles are saved at exit
