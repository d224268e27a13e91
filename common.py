"""
The small helpers the scripts share, each written once: the error line (and flags that fail in one),
the device, the tokenizer, a long text in pieces to tokenise, a file's hash, and publishing a
finished folder atomically.
"""

import argparse
import hashlib
import os
import shutil
import sys
from pathlib import Path

if sys.version_info < (3, 11):  # hashlib.file_digest, and the oldest Python the suite runs on (README, Install)
    sys.exit(f"error: qwen3-from-scratch needs Python 3.11 or newer; this is {sys.version.split()[0]}")


class UserError(Exception):
    """A problem the user can fix (a bad flag, a missing file): reported as one line, never a traceback."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (its type if it has none), at most `limit` characters."""
    return " ".join(str(e).split())[:limit] or type(e).__name__


def error(message) -> int:
    """Print `error: message` on one line to stderr; returns 1, the exit status of a failed command."""
    print(f"error: {one_line(message) if isinstance(message, BaseException) else message}", file=sys.stderr)
    return 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (not the usage dump) and exit 2."""
    def error(self, message):
        error(f"{message} (see --help)")
        sys.exit(2)


def pick_device(name: str = "auto"):
    """--device: auto (cuda, then mps, then cpu), cpu, cuda or mps, as a torch.device."""
    import torch
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        name = next(d for d in ("cuda", "mps", "cpu") if available[d])
    if name not in available:
        raise UserError(f"unknown --device {name!r}; choose auto, cpu, cuda or mps")
    if not available[name]:
        raise UserError(f"--device {name}: no {name} device is available here")
    return torch.device(name)


def free_memory(device) -> int | None:
    """Bytes this device can still hand out (CUDA's free memory, Linux's MemAvailable), None if unknown."""
    import torch
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        line = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, StopIteration, ValueError, IndexError):
        return None  # not Linux (macOS, Windows, mps): no check


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")  # any one of them makes a folder a tokenizer to transformers


def load_tokenizer(name_or_path: str, local_only: bool = False):
    """A transformers tokenizer from a folder (or, unless local_only, a hub name); never remote code."""
    from transformers import AutoTokenizer
    path = Path(name_or_path).expanduser()
    if (path.is_dir() or local_only) and not any((path / f).is_file() for f in TOKENIZER_FILES):
        # without a vocabulary file transformers would quietly build an empty tokenizer
        raise UserError(f"no tokenizer files in {path} (looked for {', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(str(name_or_path), local_files_only=local_only, trust_remote_code=False)
    except Exception as e:  # OSError offline or missing, ValueError for broken files, and more
        raise UserError(f"cannot load tokenizer '{name_or_path}': {one_line(e)}") from None


def split_text(text: str, size: int) -> list[str]:
    """`text` as consecutive pieces of at most `size` characters, each after the first starting at a
    space that a non-space follows: where the pre-tokenizers of byte-level BPE (GPT-2's, Qwen's,
    SmolLM's, ours) split anyway, so that each piece tokenises as it does inside the whole text, and
    tokenising a long text piece by piece costs memory in proportion to a piece. A stretch of `size`
    characters without such a space is cut where it ends."""
    pieces, start = [], 0
    while len(text) - start > size:
        cut = text.rfind(" ", start + 1, start + size + 1)
        while cut > start and not text[cut + 1:cut + 2].strip():  # a space that a space (or the end) follows
            cut = text.rfind(" ", start + 1, cut)
        cut = cut if cut > start else start + size
        pieces.append(text[start:cut])
        start = cut
    return pieces + [text[start:]]


def sha256(path: Path) -> str:
    """The file's SHA-256, as hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fsync_dir(path: Path):
    if os.name == "posix":  # a rename is durable only once its folder is flushed
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish(tmp: Path, final: Path, replace: bool = False):
    """Put the finished folder tmp at final, flushed to disk first and moved by renames only, so
    that final is only ever absent, the old folder or the new one, whole. replace: an existing final
    is set aside as .NAME.old, then deleted once the new one is in (after a crash between the two
    renames, the newest whole folder is .NAME.tmp if .NAME.old exists); else an existing final,
    published first by another process, is kept and tmp deleted."""
    for f in tmp.iterdir():
        if f.is_file():
            with open(f, "ab") as fh:  # "ab": a writable handle that changes nothing
                os.fsync(fh.fileno())
    fsync_dir(tmp)
    if not replace:
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(final.parent)
        return
    old = final.parent / f".{final.name}.old"
    if final.exists():
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        if old.exists() and not final.exists():
            os.rename(old, final)
        raise
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
