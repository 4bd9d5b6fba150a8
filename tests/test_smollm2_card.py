"""scripts/smollm2_risd.py card: the embedded adapter and its model card built from a run's returned
files, every number read from them; a corrupt piece or an adapter over the asset budget is refused."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run(*args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "smollm2_risd.py"), "card", *args],
                          capture_output=True, text=True)


def _outputs(tmp_path: Path, size: int) -> Path:
    src = tmp_path / "out"
    src.mkdir(parents=True)
    data = bytes(range(256)) * (size // 256)
    half = len(data) // 2
    (src / "adapter_model.safetensors.0").write_bytes(data[:half])
    (src / "adapter_model.safetensors.1").write_bytes(data[half:])
    (src / "adapter_config.json").write_text(json.dumps({"r": 32, "lora_alpha": 32.0}))
    (src / "train.json").write_text(json.dumps({
        "adapter_sha256": hashlib.sha256(data).hexdigest(), "wall_s": 450.2,
        "adapter_pieces": ["adapter_model.safetensors.0", "adapter_model.safetensors.1"],
        "last": {"step": 400, "loss": 2.11}}))
    (src / "eval.json").write_text(json.dumps({
        "exact_float32": {"identical": 64, "of": 64}, "exact_bfloat16": {"identical": 63, "of": 64},
        "tpf_T0.0": {"tpf": 2.61}, "tpf_T0.7": {"tpf": 2.05}, "humaneval": {"identical_completions": 164}}))
    (src / "speed.json").write_text(json.dumps({"device": "NVIDIA H200", "speed": {
        "T0.0": [{"concurrency": 1, "risd_over_ar": 1.9}, {"concurrency": 64, "risd_over_ar": 1.1}]}}))
    (src / "distill.json").write_text(json.dumps({"wall_s": 330.4, "manifest": {
        "response_tokens": {"train": 20_000_493, "heldout": 612_439}}}))
    return src


def test_card_reads_every_number_from_the_run(tmp_path):
    src = _outputs(tmp_path, 1 << 16)
    r = _run("--from", str(src), "--to", str(tmp_path / "asset"))
    assert r.returncode == 0, r.stderr
    card = (tmp_path / "asset" / "README.md").read_text()
    for text in ("rank-32", "20.00 M training", "0.61 M held out", "330.4 s", "400 steps", "2.11", "450.2 s",
                 "64/64 in fp32", "63/64 in bf16", "identical 164/164", "2.61 greedy", "2.05 at T = 0.7",
                 "C = 1: 1.9×", "C = 64: 1.1×", "NVIDIA H200"):
        assert text in card, text
    assert (tmp_path / "asset" / "adapter_model.safetensors").stat().st_size == 1 << 16


def test_card_refuses_a_corrupt_piece_and_an_adapter_over_budget(tmp_path):
    src = _outputs(tmp_path, 1 << 16)
    (src / "adapter_model.safetensors.1").write_bytes(b"x")
    r = _run("--from", str(src), "--to", str(tmp_path / "asset"))
    assert r.returncode != 0 and "sha256" in r.stderr + r.stdout and not (tmp_path / "asset").exists()
    big = _outputs(tmp_path / "b", 30 << 20)
    r = _run("--from", str(big), "--to", str(tmp_path / "asset2"))
    assert r.returncode != 0 and "asset budget" in r.stderr + r.stdout and not (tmp_path / "asset2").exists()


def test_card_of_a_continued_run_names_what_each_number_measured(tmp_path):
    """A run resumed over several calls whose eval measured a checkpoint and whose `tpf` stage measured the
    final adapter: the card takes TPF from tpf_final.json, names the checkpoint eval measured, sums the
    calls' wall times."""
    src = _outputs(tmp_path, 1 << 16)
    train = json.loads((src / "train.json").read_text())
    train.update(init_adapter="asset", wall_s=100.0)
    (src / "train.json").write_text(json.dumps(train))
    (src / "train_part1.json").write_text(json.dumps({"wall_s": 500.5}))
    (src / "train_part2.json").write_text(json.dumps({"wall_s": 300.0}))
    (src / "tpf_final.json").write_text(json.dumps({"tpf_T0.0": {"tpf": 1.9973}, "tpf_T0.7": {"tpf": 1.5393}}))
    (src / "eval_adapter.json").write_text(json.dumps({"step": 530, "adapter_sha256": "d68c54a0bf69" + "0" * 52}))
    r = _run("--from", str(src), "--to", str(tmp_path / "asset"))
    assert r.returncode == 0, r.stderr
    card = (tmp_path / "asset" / "README.md").read_text()
    for text in ("1.9973 greedy", "1.5393 at T = 0.7", "(the final adapter)", "step-530 checkpoint", "d68c54a0bf69",
                 "900.5 s in 3 resumed calls", "continued from the earlier version of this adapter"):
        assert text in card, text
    assert "2.61 greedy" not in card
