"""
Checkpoints that survive a crash: how train.py writes OUT/best/ and OUT/last/, and reads last/ back.

OUT/best/ (lowest validation loss so far) and OUT/last/ (the newest state) are Hugging Face model
folders: config.json, model.safetensors, the tokenizer. transformers' AutoModelForCausalLM and
AutoTokenizer load them as they are. last/ also holds what --resume needs: the optimizer states
and RNG states in training_state.pt (tensors only, read back with weights_only=True, so loading
it cannot run code) and the step, schedule and flags in training_state.json, which also records
the .pt file's SHA-256: a file that does not match is refused before it is even opened.

A save never touches the previous checkpoint until the new one is complete: it writes .NAME.tmp/,
and common.publish flushes it to disk, renames NAME/ to .NAME.old/, renames .NAME.tmp/ to NAME/,
then deletes the old one. A crash at any moment leaves a complete checkpoint under one of those
names, and `recover` (run at start) puts the newest one back in place.

One run owns OUT/ at a time: before it touches anything there it takes an exclusive OS lock on
OUT/.lock and holds it to the end, so a second train.py on the same folder is refused, naming the
first; and a folder holding another run's model is never trained into (check_out_dir). generate.py
takes no lock: it reads best/ or last/, which a save replaces in one rename.

A run replaces only what a run of ours wrote (own_out_dir). It writes a fixed set of names in OUT/
(WRITTEN) and, once the folder is its own, its note in OUT/.lock: a folder with that note (or,
from before the note, last/training_state.json) is a run's folder. Anything under those names
that is not a run's (in a folder that is not a run's, or not what a run puts there: a link, a
checkpoint without config.json) is refused in one line and left as it is, --overwrite or not. A
run's tree is its own too: a folder inside a run's best/ or last/ (replaced whole at each save) is
refused, and so is one anywhere inside the folder of a live run.
"""

import json
import math
import os
import re
import shutil
import socket
from pathlib import Path

import torch

from common import UserError, one_line, publish, sha256
from guards import CheckpointError, read_json
from plots import read_metrics
from qwen3 import Qwen3, Qwen3Config, read_config, save_pretrained

try:
    import fcntl  # POSIX file locks
except ImportError:  # Windows has no flock: there, nothing keeps two runs on one folder apart
    fcntl = None

_held = []  # the out-dir lock files this process holds open

# What a run writes in OUT/, by name, and what each is: it replaces these and nothing else.
WRITTEN = {"best": "checkpoint", "last": "checkpoint", ".best.tmp": "folder", ".best.old": "folder",
           ".last.tmp": "folder", ".last.old": "folder", "metrics.jsonl": "file", "curves.png": "file",
           ".curves.png.tmp": "file", "experts.png": "file", ".experts.png.tmp": "file"}
NOTE = re.compile(r"pid \d+ on \S+\n")  # what a run writes in OUT/.lock once the folder is its own


def _note(f) -> str:
    """What a lock file holds (its first 200 characters)."""
    f.seek(0)
    return f.read(200)


def lock_out_dir(out: Path):
    """Create OUT/ and hold an exclusive lock on OUT/.lock until release_out_dirs() or the end of
    the process. The OS drops a flock when its process dies, kill -9 included, so it is never stale;
    the file stays, naming its last holder. A run that finds the lock held is refused having changed
    nothing: only the holder writes into the file (note_holder, once the folder is known to be its
    own), and never into a .lock that is a link or holds anything but a run's note."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out-dir {out} is a file, not a folder; name a folder (it is created if missing)")
    lock = out / ".lock"
    try:
        out.mkdir(parents=True, exist_ok=True)
        if lock.is_symlink() or (lock.exists() and not lock.is_file()):
            raise CheckpointError(f"{lock} is not a lock file of train.py (a link, or not a file); it is left "
                                  f"alone: use another --out-dir")
        f = open(lock, "a+", errors="replace")  # "a+": opening it never truncates the holder's note
    except OSError as e:
        raise CheckpointError(f"cannot use --out-dir {out} ({e.strerror or e})") from None
    try:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = " ".join(_note(f).split()) or "pid not written yet"
        f.close()
        if isinstance(e, BlockingIOError):
            raise CheckpointError(f"{out} is in use by another train.py ({holder}); wait for it to finish "
                                  f"or use another --out-dir") from None
        raise CheckpointError(f"cannot lock {lock} ({e.strerror or e})") from None
    _held.append(f)
    if _note(f) and not NOTE.fullmatch(_note(f)):
        raise CheckpointError(f"{lock} holds text that train.py did not write; it is left alone: use another --out-dir")


def note_holder():
    """Say in the lock file of the out-dir just locked who holds it: the mark of a run's folder."""
    if _held:
        f = _held[-1]
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()


def release_out_dirs():
    """Let go of the out-dirs this process holds (train.main does at its end: in-process callers
    may run again on the same folder)."""
    while _held:
        _held.pop().close()


def is_run_dir(path: Path) -> bool:
    """Whether a run of ours wrote this folder: its .lock names a holder, or (from before the note)
    its last/ holds training_state.json."""
    lock = path / ".lock"
    try:
        if lock.is_file() and not lock.is_symlink():
            with open(lock, errors="replace") as f:
                if NOTE.fullmatch(f.read(200)):
                    return True
    except OSError:
        pass
    return (path / "last" / "training_state.json").is_file()


def _as_written(path: Path, kind: str) -> bool:
    """Whether path is what a run writes under its name: never a link; a checkpoint (a folder with
    config.json), a folder, or a file."""
    if path.is_symlink():
        return False
    if kind == "checkpoint":
        return path.is_dir() and (path / "config.json").is_file()
    return path.is_dir() if kind == "folder" else path.is_file()


def _live_holder(lock: Path) -> str | None:
    """The note of the process holding `lock` now, if one does (a probe: it takes nothing)."""
    if fcntl is None or not lock.is_file():
        return None
    try:
        with open(lock, errors="replace") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released as the file closes
            except BlockingIOError:
                return " ".join(_note(f).split()) or "pid not written yet"
    except OSError:
        pass
    return None


def runs_above(path: Path):
    """The run folders that `path` lies inside, nearest first: (folder, the name in it path lies under)."""
    path = path.resolve()
    for parent in path.parents:
        if is_run_dir(parent):
            yield parent, path.relative_to(parent).parts[0]


def check_outside_saves(path: Path, flag: str):
    """Refuse a folder inside a run's best/ or last/: a save replaces them whole."""
    for parent, name in runs_above(path):
        if name in WRITTEN:
            raise CheckpointError(f"{flag} {path} lies inside {parent / name}, which the run in {parent} replaces "
                                  f"at every save; use a folder outside it")


def own_out_dir(out: Path) -> str | None:
    """Before anything in OUT/ is touched: refuse a folder inside another run's, lock it, refuse it
    unless all it holds under the names a run writes is a run's, mark it this run's, then finish a
    save cut short. Returns why that failed (None: it did not)."""
    try:
        check_outside_saves(out, "--out-dir")
        for parent, _ in runs_above(out):
            holder = _live_holder(parent / ".lock")
            if holder:
                raise CheckpointError(f"--out-dir {out} lies inside {parent}, the folder of a running train.py "
                                      f"({holder}); use a folder outside it")
        lock_out_dir(out)
        ours = is_run_dir(out)
        theirs = [name for name, kind in WRITTEN.items()
                  if os.path.lexists(out / name) and not (ours and _as_written(out / name, kind))]
        if theirs:
            raise CheckpointError(f"--out-dir {out} holds {', '.join(theirs)}, which no train.py run wrote there; "
                                  f"train.py replaces only what a run wrote, so it leaves them alone: use another "
                                  f"--out-dir")
        note_holder()
        recover(out)
    except (CheckpointError, OSError) as e:
        return str(e)
    return None


def recover(out: Path):
    """Finish or undo a save that a crash interrupted."""
    for name in ("best", "last"):
        final, tmp, old = out / name, out / f".{name}.tmp", out / f".{name}.old"
        if not final.exists() and old.exists():
            os.rename(tmp if tmp.exists() else old, final)  # tmp is complete once old exists
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def check_out_dir(out: Path, config: Qwen3Config, shape: tuple, resuming: bool, overwrite: bool):
    """Refuse to mix runs: a checkpoint already in OUT/ is continued (--resume), replaced
    (--overwrite) or left alone (error), and --resume must not change the model's `shape` fields."""
    existing = next((out / n for n in ("last", "best") if (out / n / "config.json").is_file()), None)
    metrics = out / "metrics.jsonl"
    if existing is None and not (resuming or overwrite) and metrics.is_file() and metrics.stat().st_size:
        raise UserError(f"{out} already holds a run's {metrics.name} (a run that saved no checkpoint); pass "
                        f"--overwrite to start again")
    if existing is None or (overwrite and not resuming):
        return
    theirs = read_config(existing / "config.json")
    diff = [f"{k} {getattr(theirs, k)} there, {getattr(config, k)} here" for k in shape
            if getattr(theirs, k) != getattr(config, k)]
    if diff:
        raise UserError(f"{out} holds a different model ({'; '.join(diff)}); use another --out-dir"
                        + ("" if resuming else " or --overwrite"))
    if not resuming:
        raise UserError(f"{out} already holds a checkpoint ({existing}); pass --resume to continue it "
                        f"or --overwrite to start again")


def open_out_dir(out: Path, overwrite: bool, resumed_step: int | None):
    """Ready OUT/ for this session, once setup has succeeded (a bad flag deletes nothing): --overwrite
    removes the old checkpoints; metrics.jsonl starts empty, or a resumed run's goes on from its step."""
    if overwrite and resumed_step is None:
        for name in ("best", "last"):
            shutil.rmtree(out / name, ignore_errors=True)
    metrics = out / "metrics.jsonl"
    kept = [r for r in read_metrics(metrics) if r["step"] <= resumed_step] if resumed_step is not None else []
    metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))


def save_checkpoint(out: Path, name: str, model: Qwen3, tokenizer, state: dict | None = None, info: dict | None = None):
    """OUT/NAME/: the model and tokenizer, and with `state` (tensors) and `info` (JSON) what --resume needs."""
    final, tmp = out / name, out / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_pretrained(model, tmp)
        tokenizer.save_pretrained(tmp)
        if state is not None:
            torch.save(state, tmp / "training_state.pt")
            info = {**info, "training_state_sha256": sha256(tmp / "training_state.pt")}
            (tmp / "training_state.json").write_text(json.dumps(info, indent=2) + "\n")
        publish(tmp, final, replace=True)
    except Exception as e:  # disk full, permissions, ...: whatever it is, the old checkpoint stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"saving {final} failed ({one_line(e)}); the previous checkpoint is intact") from None


def _integer(v, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v < 2**31


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# training_state.json's fields: what each must be (a check, and how it reads). args, the flags, are
# checked by flags.with_saved_flags as flags typed on the command line are.
STATE_FIELDS = {
    "step": (_integer, "an integer in [0, 2**31)"),
    "best_val_loss": (lambda v: v is None or _number(v), "a finite number or null"),
    "best_step": (lambda v: v is None or _integer(v, 1), "null or an integer in [1, 2**31)"),
    "elapsed_s": (lambda v: _number(v) and v >= 0, "a finite number of seconds >= 0"),
    "steps_s": (lambda v: _number(v) and v >= 0, "a finite number of seconds >= 0"),
    "data_key": (lambda v: isinstance(v, str), "a string"),
    "training_state_sha256": (lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v), "a SHA-256 in hex"),
    "args": (lambda v: isinstance(v, dict), "an object of flags"),
}
OPTIONAL_FIELDS = ("steps_s", "data_key")  # absent from checkpoints saved before they were added


def read_training_info(last: Path) -> dict:
    """last/training_state.json: the run's step, best score, elapsed time and flags, each field
    checked (a fractional step would never reach --max-steps, a string loss fail mid-run)."""
    path = last / "training_state.json"
    if not path.is_file():
        raise CheckpointError(f"--resume: no checkpoint to resume from ({path} not found)")
    try:
        info = read_json(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({one_line(e, 200)})") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    missing = set(STATE_FIELDS) - set(OPTIONAL_FIELDS) - info.keys()
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(sorted(missing))}")
    for name, (ok, what) in STATE_FIELDS.items():
        if name in info and not ok(info[name]):
            raise CheckpointError(f"{path}: {name} must be {what}, got {one_line(repr(info[name]), 60)}")
    if (info["best_step"] is None) != (info["best_val_loss"] is None) or (info["best_step"] or 0) > info["step"]:
        raise CheckpointError(f"{path}: best_step {info['best_step']} and best_val_loss {info['best_val_loss']} "
                              f"do not fit step {info['step']} (both null, or a best step no later than the step)")
    return info


def training_state(optimizers: list, device: torch.device) -> dict:
    """What training_state.pt holds: the optimizers' states (their moments) and the RNG streams."""
    state = dict(optimizers=[o.state_dict() for o in optimizers], rng_cpu=torch.get_rng_state())
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_training_state(last: Path, info: dict, optimizers: list, device: torch.device):
    """Put last/training_state.pt back, once its checksum matches `info`'s: the optimizers' moments
    (their learning rates, decay and betas stay those of the flags) and the RNG streams."""
    path = last / "training_state.pt"
    if not path.is_file() or sha256(path) != info.get("training_state_sha256"):
        raise CheckpointError(f"{path} is missing or does not match the checksum in training_state.json "
                              f"(corrupt or tampered); refusing to load it")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain containers only
    except Exception as e:
        raise CheckpointError(f"{path} could not be loaded safely ({one_line(e, 200)})") from None
    try:
        for opt, opt_state in zip(optimizers, state["optimizers"], strict=True):
            hypers = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            opt.load_state_dict(opt_state)
            for group, hyper in zip(opt.param_groups, hypers, strict=True):
                group.update(hyper)
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path} does not fit this run (was --optimizer changed?): {one_line(e, 200)}") from None
