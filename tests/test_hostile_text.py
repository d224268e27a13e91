"""generate.py against hostile text (issue 23): text that is not UTF-8, wherever it enters (class 5),
and malformed flags (class 6); prompts without end or of gigabytes, many prompts times many samples,
and chat templates that loop or grow without end (class 2). Each is one line and a clean exit, or is
read and run in bounded memory; the interactive prompt goes on after a bad line. In-process where
the limits can be made small (monkeypatch), real processes where the path through the OS is the
point (argv, a terminal).
"""
import io
import os
import re
import resource
import shutil
import signal
import subprocess
import sys

import pexpect
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

import generate
import interactive
import sampling
from test_generate import (CONTEXT, PROMPT, ROOT, SCRIPT, TEXT, assert_one_line_error, ckpt, continuation,  # noqa: F401
                           hf, hf_greedy, run_main, tok)

FRAME = settings(derandomize=True, database=None, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def limit_memory(extra: int):
    """Let this process map at most `extra` bytes more than it does now; returns the limit it had."""
    before = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (mapped + extra, before[1]))
    return before


@pytest.fixture
def guarded():
    """Were a limit of generate.py's to fail, the test fails rather than hang or fill the machine's
    memory: at most 2 GiB more than this process maps now, and 120 s."""
    def hang(signum, frame):
        raise TimeoutError("no answer within 120 s")
    before, handler = limit_memory(2**31), signal.signal(signal.SIGALRM, hang)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, handler)
    resource.setrlimit(resource.RLIMIT_AS, before)


def exit_code(capsys, *argv):
    """generate.main in this process: (its exit code, stdout, stderr)."""
    try:
        out, err = run_main(capsys, *argv)
        return 0, out, err
    except SystemExit as e:
        captured = capsys.readouterr()
        return e.code, captured.out, captured.err


def stdin_of(monkeypatch, raw: bytes):
    """stdin as a process gets it: bytes behind a text stream (not a terminal)."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw)))


# %% class 5: text must be UTF-8, wherever it comes from

BAD = b"caf\xe9 au lait"  # Latin-1, not UTF-8: byte 0xe9 at character 4


@pytest.mark.parametrize("source", ["--prompt", "stdin", "--prompt-file"])
def test_text_that_is_not_utf8_is_one_line(ckpt, tmp_path, capsys, monkeypatch, source):
    """The same bytes through each way in: one line saying where and which byte, exit 1."""
    if source == "--prompt":
        argv = ["--prompt", os.fsdecode(BAD)]  # as Python decodes argv
        where = "--prompt"
    elif source == "stdin":
        stdin_of(monkeypatch, BAD + b"\n")
        argv, where = ["--prompt", "-"], "stdin"
    else:
        (tmp_path / "p.txt").write_bytes(b"The cat\n\n" + BAD + b"\nThe dog\n")
        argv, where = ["--prompt-file", tmp_path / "p.txt"], f"--prompt-file {tmp_path / 'p.txt'}, line 3,"
    code, out, err = exit_code(capsys, "--ckpt", ckpt, *argv, "-n", 3)
    assert code == 1 and out == ""
    assert_one_line_error(err, f"{where} is not UTF-8 text (byte 0xe9 at character 4)")


@settings(FRAME, max_examples=25)
@given(raw=st.binary(max_size=12))
def test_any_bytes_are_a_prompt_or_one_line(ckpt, tmp_path_factory, capsys, raw):
    """Any bytes as a prompt file's line: UTF-8 ones are continued, any other is one line naming the
    line; never a traceback."""
    path = tmp_path_factory.mktemp("bytes") / "p.txt"
    path.write_bytes(b"The cat\n" + raw.replace(b"\n", b"").replace(b"\r", b"") + b"x\n")
    code, out, err = exit_code(capsys, "--ckpt", ckpt, "--prompt-file", path, "-n", 2, "--temperature", 0)
    try:
        raw.decode("utf-8")
        assert code == 0, err
        assert out.startswith("The cat")
    except UnicodeDecodeError:
        assert code == 1 and out == ""
        assert_one_line_error(err, f"--prompt-file {path}, line 2, is not UTF-8 text (byte 0x")


def test_the_interactive_prompt_refuses_a_line_and_goes_on(ckpt, hf, tok, capsys, monkeypatch):
    """Lines from a pipe: one that is not UTF-8 is an error line; the lines around it are answered,
    and the session ends as usual at the end of its input."""
    stdin_of(monkeypatch, PROMPT.encode() + b"\n" + BAD + b"\n/quit\n")
    code, out, err = exit_code(capsys, "--ckpt", ckpt, "-n", 4, "--temperature", 0)
    assert code == 0, err
    assert err == "error: the line is not UTF-8 text (byte 0xe9 at character 4); text must be UTF-8\n"
    ids = tok.encode(PROMPT)
    assert PROMPT + continuation(tok, ids, hf_greedy(hf, ids, 4, {tok.eos_token_id})) in out


def test_a_terminal_line_that_is_not_utf8(ckpt):
    """At a terminal: the same line, and the session goes on. (Without the readline module, as on
    Pythons built without it: readline's line editing drops such bytes itself as they are typed.)"""
    argv = [SCRIPT, "--ckpt", str(ckpt), "-n", "3", "--device", "cpu"]
    run = (f"import sys, runpy; sys.modules['readline'] = None; sys.argv = {argv!r}; "
           f"runpy.run_path({SCRIPT!r}, run_name='__main__')")
    child = pexpect.spawn(sys.executable, ["-c", run], cwd=str(ROOT),
                          env={**os.environ, "TERM": "dumb"}, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect_exact(b"> ")
    child.send(BAD + b"\r")
    child.expect_exact(b"error: the line is not UTF-8 text (byte 0xe9 at character 4)")
    child.expect_exact(b"> ")
    child.sendline(b"/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert b"Traceback" not in child.before and child.exitstatus == 0


def test_argv_and_stdin_in_a_real_process(ckpt):
    for argv, stdin in (([b"--prompt", BAD], None), ([b"--prompt", b"-"], BAD)):
        result = subprocess.run([sys.executable, SCRIPT, "--ckpt", str(ckpt), "--device", "cpu", *argv], input=stdin,
                                capture_output=True, timeout=300, cwd=ROOT)
        assert result.returncode == 1 and result.stdout == b""
        assert_one_line_error(result.stderr.decode(), "is not UTF-8 text (byte 0xe9 at character 4)")


@pytest.mark.parametrize("argv, message", [
    (["-n", "x"], "argument -n/--max-new-tokens: invalid int value: 'x'"),
    (["--temperature", "warm"], "argument --temperature: invalid float value: 'warm'"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
])
def test_a_bad_flag_is_one_line(capsys, argv, message):
    """As train.py's: one line and exit 2, not argparse's usage block."""
    code, out, err = exit_code(capsys, *argv)
    assert code == 2 and out == ""
    assert_one_line_error(err, message, "(see --help)")


# %% class 2: prompts are read and tokenised in bounded memory


def test_a_prompt_of_one_huge_line_keeps_its_end(ckpt, hf, tok, tmp_path, capsys, monkeypatch):
    """A prompt file of one line far longer than what is kept (the test makes the limits small): only
    its last TAIL_CHARS characters are held, the tokenizer never sees more than a piece of them, and
    the model gets the same last tokens as if the whole line had been tokenised."""
    monkeypatch.setattr(sampling, "TAIL_CHARS", 2**12)
    monkeypatch.setattr(sampling, "PIECE_CHARS", 2**9)
    text = " ".join(TEXT * 400)  # ~60,000 characters
    (tmp_path / "one.txt").write_text(text + "\n")
    seen = []
    encode = type(tok).encode

    def spy(self, text, *args, **kwargs):
        seen.append(len(text))
        return encode(self, text, *args, **kwargs)
    monkeypatch.setattr(type(tok), "encode", spy)
    n = 6
    code, out, err = exit_code(capsys, "--ckpt", ckpt, "--prompt-file", tmp_path / "one.txt", "--prompt", PROMPT,
                               "-n", n, "--temperature", 0)
    assert code == 0, err
    assert "keeping the last" in err and max(seen) <= 2**9
    kept = encode(tok, text)[-(CONTEXT - n):]
    sample = tok.decode(kept) + continuation(tok, kept, hf_greedy(hf, kept, n, {tok.eos_token_id}))
    assert out.split("\n---------------\n")[1] == sample + "\n"


@pytest.mark.parametrize("source", ["--prompt-file", "stdin", "interactive"])
def test_a_prompt_without_end_is_refused(ckpt, capsys, monkeypatch, guarded, source):
    """/dev/zero (a line that never ends) as a prompt file, as stdin for --prompt -, as the
    interactive prompt's input: read a piece at a time, refused once TEXT_CHARS have gone by (the
    test makes it 1 Mi), in one line; memory never holds more than TAIL_CHARS of it."""
    monkeypatch.setattr(sampling, "TEXT_CHARS", 2**20)
    monkeypatch.setattr(sampling, "TAIL_CHARS", 2**12)
    if source == "--prompt-file":
        argv, where = ["--prompt-file", "/dev/zero"], "--prompt-file /dev/zero, line 1,"
    else:
        monkeypatch.setattr(sys, "stdin", open("/dev/zero"))
        argv, where = (["--prompt", "-"], "stdin") if source == "stdin" else ([], "stdin")
    code, out, err = exit_code(capsys, "--ckpt", ckpt, *argv)
    assert code == 1
    assert_one_line_error(err, f"{where} runs past 1,048,576 characters")


def test_dev_zero_as_a_prompt_file_in_a_real_process(ckpt):
    """With the real limits: refused after 256 Mi characters, not run until memory runs out."""
    result = subprocess.run([sys.executable, SCRIPT, "--ckpt", str(ckpt), "--device", "cpu", "--prompt-file",
                             "/dev/zero"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            preexec_fn=lambda: limit_memory(2**32))
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "--prompt-file /dev/zero, line 1, runs past 268,435,456 characters in one "
                                         "line")


@settings(FRAME, max_examples=8)
@given(prompts=st.lists(st.sampled_from([PROMPT, "The dog", " ".join(TEXT), "Café"]), min_size=1, max_size=9),
       samples=st.integers(1, 3), rows=st.integers(1, 5), tokens=st.integers(1, 300))
def test_prompts_times_samples_go_in_batches_that_fit(ckpt, tmp_path_factory, capsys, monkeypatch, prompts, samples,
                                                     rows, tokens):
    """Prompts x --num-samples rows (200,000 lines once made one batch, and the allocator a traceback):
    batches of at most BATCH_ROWS rows and BATCH_TOKENS tokens (a row alone may be longer), each
    decoded and printed in turn; greedy, the output is the one-batch output."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("".join(p + "\n" for p in prompts) + "\n")
    argv = ["--ckpt", ckpt, "--prompt-file", path, "--prompt", "The", "-n", 5, "--temperature", 0,
            "--num-samples", samples]
    whole = exit_code(capsys, *argv)
    shapes, decode = [], generate.generate

    def noted(model, idx, n, **kwargs):
        shapes.append((idx.size(0), idx.size(1) + n))
        return decode(model, idx, n, **kwargs)
    monkeypatch.setattr(generate, "generate", noted)
    monkeypatch.setattr(generate, "BATCH_ROWS", rows)
    monkeypatch.setattr(generate, "BATCH_TOKENS", tokens)
    assert exit_code(capsys, *argv) == whole
    assert sum(b for b, _ in shapes) == samples * (1 + len(prompts))
    assert all(b <= rows and (b == 1 or b * t <= tokens) for b, t in shapes)


# %% class 2: a chat template gets a time and a memory budget

HOSTILE_TEMPLATES = {  # template: what the line says
    "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}": "ran for more than 2 s",
    "{{ 'x' * 10**10 }}": "took more than 268,435,456 bytes of memory",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}":
        "took more than 268,435,456 bytes of memory",
    "{% for i in range(3000) %}{{ 'y' * 1000 }}{% endfor %}": "made 3,000,000 characters of 65,544 at most",
    "{{ raise_exception('this template wants a system prompt') }}": "this template wants a system prompt",
    "{% for %}": "the chat template failed:",
}


@pytest.fixture(scope="module")
def chat_ckpt(ckpt, tmp_path_factory):
    """A copy of the small checkpoint, to be given a chat template by each test."""
    return shutil.copytree(ckpt, tmp_path_factory.mktemp("chat"), dirs_exist_ok=True)


def with_template(chat_ckpt, template):
    tok = AutoTokenizer.from_pretrained(chat_ckpt)
    tok.chat_template = template
    tok.save_pretrained(chat_ckpt)


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES)
def test_a_hostile_chat_template_is_one_line(chat_ckpt, capsys, monkeypatch, guarded, template):
    """A template that loops for hours, builds a string of gigabytes (at once or by doubling), makes
    megabytes of text from a short message, raises, or does not parse: stopped within its budget
    (the test makes it 2 s and 256 MiB), one line, exit 1."""
    monkeypatch.setattr(sampling, "TEMPLATE_SECONDS", 2)
    monkeypatch.setattr(sampling, "TEMPLATE_BYTES", 2**28)
    with_template(chat_ckpt, template)
    code, out, err = exit_code(capsys, "--ckpt", chat_ckpt, "--chat", "--prompt", "Hi", "-n", 2)
    assert code == 1 and out == ""
    assert_one_line_error(err, "the chat template", HOSTILE_TEMPLATES[template])


def test_a_chat_template_error_leaves_the_session_going(chat_ckpt, capsys, monkeypatch):
    """Interactively, a template that fails is an error line; the next line is read, and the
    conversation goes on without the message that failed."""
    monkeypatch.setattr(sampling, "TEMPLATE_SECONDS", 2)
    with_template(chat_ckpt, "{% if messages[-1]['content'] == 'boom' %}{{ raise_exception('it blew up') }}{% endif %}"
                             "{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    lines = iter(["Hi", "boom", "Third", "/quit"])
    monkeypatch.setattr(interactive, "read_line", lambda prompt="": next(lines))
    code, out, err = exit_code(capsys, "--ckpt", chat_ckpt, "--chat", "--show-prompt", "-n", 2, "--temperature", 0)
    assert code == 0, err
    assert err.count("error: the chat template failed: it blew up") == 1
    assert len(re.findall(r"^\[(\d+|no) tokens", out, re.M)) == 2  # the other two lines were answered
    last = err.split("--- prompt")[-1]
    assert last.startswith(" (") and "[Hi]" in last and "[Third]" in last and "boom" not in last
