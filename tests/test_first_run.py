"""The first ten minutes (issue 17): every option's help shows its default, CPU threads follow the model
size or the user, the shipped algorithm config loads, the CPU KV pool fits the model, and a GGUF is
converted once (the next load reads the cached safetensors)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from idlm.cli import build_parser, main
from idlm.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def _options(parser: argparse.ArgumentParser, name: str = "idlm"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _options(sub, f"{name} {sub_name}")
        elif not isinstance(action, argparse._HelpAction) and action.help != argparse.SUPPRESS:
            yield name, parser, action


def test_every_option_has_help_with_its_default():
    missing = []
    for name, parser, action in _options(build_parser()):
        text = parser._get_formatter()._expand_help(action) if action.help else ""
        if not text.strip():
            missing.append(f"{name} {action.dest}: no help")
        elif (action.option_strings and not action.required and not isinstance(action, argparse._StoreTrueAction)
              and "default" not in text):
            missing.append(f"{name} {action.dest}: no default in {text!r}")
    assert not missing, "\n".join(missing)


def test_generate_help_shows_decoder_stride_and_max_tokens(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: ar)", "(default: 4)", "(default: 128)", "IDLM_NUM_THREADS"):
        assert shown in text


def test_threads_follow_model_size_env_and_option(monkeypatch):
    from idlm.inference import default_threads, load_for_inference, physical_cores

    monkeypatch.delenv("IDLM_NUM_THREADS", raising=False)
    assert default_threads(14_600_000) == 1
    assert default_threads(135_000_000) == min(physical_cores(), 8)
    assert default_threads(14_600_000, threads=3) == 3
    monkeypatch.setenv("IDLM_NUM_THREADS", "2")
    assert default_threads(14_600_000) == 2
    assert default_threads(14_600_000, threads=1) == 1  # the option wins over the environment
    monkeypatch.setenv("IDLM_NUM_THREADS", "many")
    with pytest.raises(ConfigError, match="IDLM_NUM_THREADS"):
        load_for_inference("idlm-tiny", device="cpu")
    monkeypatch.delenv("IDLM_NUM_THREADS")
    before = torch.get_num_threads()
    try:
        assert load_for_inference("idlm-tiny", device="cpu").threads == 1 == torch.get_num_threads()
        assert load_for_inference("idlm-tiny", device="cpu", threads=2).threads == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_shipped_algorithm_config_loads():
    from idlm.server.launch import read_algorithm_config, resolve_options

    path = REPO / "configs" / "idlm_blockN4_config.yaml"
    cfg = read_algorithm_config(str(path))
    assert cfg["gen_block_size"] == 4 and cfg["block_size"] == 7
    parser = argparse.ArgumentParser()
    build_parser()  # the serve options need the CLI's helpers importable
    from idlm.server.launch import add_serve_arguments

    add_serve_arguments(parser)
    args = parser.parse_args(["--dllm-algorithm", "IDLMBlockN", "--dllm-algorithm-config", str(path)])
    opts = resolve_options(args)
    assert opts["decoder"] == "isd" and opts["stride"] == 4
    assert "idlm_blockN4_config.yaml" in (REPO / "README.md").read_text() and "configs/idlm_blockN4" in (
        REPO / "README.md").read_text()


def test_cpu_kv_pool_is_sized_to_the_model(tiny):
    from idlm.engine.model_runner import CPU_FULL_REQUESTS, ModelRunner
    from idlm.layers.paged_attention import PagedKVCache

    model, _ = tiny
    runner = ModelRunner(model, block_size=16, num_blocks=None, max_model_len=2048, max_num_seqs=64,
                         cuda_graphs=False)
    per_block = PagedKVCache.bytes_per_block(model.config, 16, model.dtype)
    assert runner.num_blocks == CPU_FULL_REQUESTS * runner.max_pages  # 4 full-length requests, not 1 GiB
    assert runner.num_blocks * per_block < 200 << 20
    one = ModelRunner(model, block_size=16, num_blocks=None, max_model_len=2048, max_num_seqs=1, cuda_graphs=False)
    assert one.num_blocks == one.max_pages  # never more than max_num_seqs full-length requests use
    short = ModelRunner(model, block_size=16, num_blocks=None, max_model_len=64, max_num_seqs=8, cuda_graphs=False)
    assert short.num_blocks == max(16, 8 * short.max_pages)
    assert ModelRunner(model, block_size=16, num_blocks=40, max_model_len=2048, cuda_graphs=False).num_blocks == 40


def _write_gguf(path: Path) -> dict[str, np.ndarray]:
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    hidden, inter, heads, vocab = 16, 32, 2, 24
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_uint32("llama.vocab_size", vocab)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_k.weight": (hidden, hidden),
              "blk.0.attn_v.weight": (hidden, hidden), "blk.0.attn_output.weight": (hidden, hidden),
              "blk.0.ffn_gate.weight": (inter, hidden), "blk.0.ffn_up.weight": (inter, hidden),
              "blk.0.ffn_down.weight": (hidden, inter)}
    arrays = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    for name, arr in arrays.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return arrays


def test_gguf_is_converted_once_then_read_from_the_cache(tmp_path, monkeypatch):
    from idlm.models import gguf as gguf_mod
    from idlm.models.loader import load_model

    monkeypatch.setenv("IDLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("IDLM_GGUF_CACHE", raising=False)
    path = tmp_path / "tiny.gguf"
    _write_gguf(path)
    first = load_model(path)
    cached = list((tmp_path / "cache" / "converted").glob("tiny.*.safetensors"))
    assert len(cached) == 1 and not list(cached[0].parent.glob(".*tmp*"))  # written atomically, no leftovers

    def no_parse(*a, **k):
        raise AssertionError("the GGUF was parsed again")

    monkeypatch.setattr(gguf_mod, "open_gguf", no_parse)
    second = load_model(path)
    for (n1, p1), (n2, p2) in zip(first.state_dict().items(), second.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    # a changed file (new sha256) is converted again; a damaged cache file is replaced
    monkeypatch.undo()
    monkeypatch.setenv("IDLM_CACHE", str(tmp_path / "cache"))
    cached[0].write_bytes(b"not safetensors")
    third = load_model(path)
    assert torch.equal(third.model.embed_tokens.weight, first.model.embed_tokens.weight)
    assert cached[0].stat().st_size > 100


def test_fetched_gguf_is_cached_next_to_it(tmp_path, monkeypatch):
    from idlm.models.gguf import converted_path

    monkeypatch.setenv("IDLM_CACHE", str(tmp_path))
    inside = tmp_path / "smollm2-135m-instruct" / "m.gguf"
    assert converted_path(inside, "ab" * 32).parent == inside.parent
    assert converted_path(tmp_path.parent / "elsewhere" / "m.gguf", "ab" * 32).parent == tmp_path / "converted"


def test_the_command_line_parser_does_not_import_torch():
    """`idlm --help` answers without loading torch (a subcommand imports it when it runs)."""
    import subprocess
    import sys

    code = "import sys, idlm.cli; idlm.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
