"""The token and tokenizer cache of data.py is verified before it is trusted: every kind of damage
is noticed, said in one line and rebuilt into exactly what a fresh build gives; temporary folders
of killed runs are cleaned, those of live ones kept. Also the one-line messages for a broken
.jsonl line and an empty tokenizer folder.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import data
import train
from common import UserError, sha256

ROOT = Path(__file__).resolve().parent.parent
KW = dict(vocab_size=512, max_docs=60, max_tokens=None, val_frac=0.1, split_seed=0, text_field="text")


def prepare(cache):
    logs = []
    d = data.prepare_data("embedded", "auto", **KW, cache_dir=cache, log=logs.append)
    return d, logs


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A cache built once from nothing, and copies of what it holds."""
    cache = tmp_path_factory.mktemp("fresh")
    d, _ = prepare(cache)
    return cache, np.array(d.train), np.array(d.val), d.tokenizer.get_vocab()


def replace_bytes(path: Path, content: bytes):
    """Rewrite a file under a new inode, as an editor or a bad disk copy would: memmaps of the old
    contents (this process still holds some) stay valid."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(content)
    os.replace(tmp, path)


def rewrite_meta(entry: Path, **changes):
    meta = json.loads((entry / "meta.json").read_text())
    meta.update(changes)
    replace_bytes(entry / "meta.json", json.dumps(meta).encode())


def out_of_vocab(entry: Path):
    """Ids beyond the vocabulary, with meta.json's sizes and checksums made to agree (only the
    bound on the ids can tell)."""
    ids = np.fromfile(entry / "train.bin", dtype=np.uint16)
    ids[len(ids) // 2] = 60_000
    replace_bytes(entry / "train.bin", ids.tobytes())
    meta = json.loads((entry / "meta.json").read_text())
    meta["files"]["train.bin"]["sha256"] = sha256(entry / "train.bin")
    replace_bytes(entry / "meta.json", json.dumps(meta).encode())


def flip_a_byte(content: bytes) -> bytes:
    i = len(content) // 2
    return content[:i] + bytes([content[i] ^ 1]) + content[i + 1:]


def size_of(entry, name):
    return (entry / name).stat().st_size


def cut(path: Path, keep):
    replace_bytes(path, path.read_bytes()[:keep])


DAMAGE = {  # kind: (how, what the line says)
    "truncated_half": (lambda e: cut(e / "train.bin", size_of(e, "train.bin") // 2),
                       "train.bin has {half:,} bytes, not {full:,}"),
    "odd_byte_count": (lambda e: cut(e / "train.bin", -1),
                       "train.bin has {odd:,} bytes, not {full:,}"),
    "empty": (lambda e: replace_bytes(e / "train.bin", b""), "train.bin has 0 bytes"),
    "random_bytes": (lambda e: replace_bytes(e / "train.bin", np.random.default_rng(0).bytes(size_of(e, "train.bin"))),
                     "train.bin fails its SHA-256 check"),
    "all_zeros": (lambda e: replace_bytes(e / "val.bin", bytes(size_of(e, "val.bin"))),
                  "val.bin fails its SHA-256 check"),
    "ids_out_of_vocab": (out_of_vocab, "train.bin holds token id 60000, beyond the vocabulary of 512"),
    "meta_unparseable": (lambda e: replace_bytes(e / "meta.json", b'{"train_tokens": 12'), "meta.json is unreadable"),
    "meta_missing": (lambda e: (e / "meta.json").unlink(), "meta.json is missing"),
    "meta_of_an_older_version": (lambda e: rewrite_meta(e, files=None), "meta.json records no files"),
    "meta_token_count": (lambda e: rewrite_meta(e, train_tokens=12), "train.bin has {full:,} bytes for 12 tokens"),
    "file_missing": (lambda e: (e / "val.bin").unlink(), "val.bin is missing"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_token_cache_is_rebuilt(kind, fresh, tmp_path):
    cache = shutil.copytree(fresh[0], tmp_path / "cache")
    (entry,) = cache.glob("tokens-*")
    full = size_of(entry, "train.bin")
    damage, says = DAMAGE[kind]
    damage(entry)
    d, logs = prepare(cache)
    line = f"data: the token cache in {entry} is damaged ({says.format(full=full, half=full // 2, odd=full - 1)}"
    damaged = [s for s in logs if "is damaged (" in s]
    assert len(damaged) == 1 and damaged[0].startswith(line) and damaged[0].endswith("; rebuilding it"), logs
    assert any(s.startswith("data: tokenising") for s in logs) and not any("tokenizer" in s for s in logs)
    assert np.array_equal(d.train, fresh[1]) and np.array_equal(d.val, fresh[2])  # exactly a fresh build
    assert d.meta["train_tokens"] == len(fresh[1])
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # nothing left aside
    assert prepare(cache)[1] == [f"data: using cached tokens in {entry}"]  # and the rebuilt entry is sound


TOKENIZER_DAMAGE = {
    "tokenizer_json_truncated": (lambda e: cut(e / "tokenizer.json", 100),
                                 "tokenizer.json has 100 bytes"),
    "tokenizer_json_one_byte": (lambda e: replace_bytes(e / "tokenizer.json",
                                                        flip_a_byte((e / "tokenizer.json").read_bytes())),
                                "tokenizer.json fails its SHA-256 check"),
    "tokenizer_config_missing": (lambda e: (e / "tokenizer_config.json").unlink(), "tokenizer_config.json is missing"),
    "written_by_an_older_version": (lambda e: (e / "meta.json").unlink(), "meta.json is missing"),
}


@pytest.mark.parametrize("kind", TOKENIZER_DAMAGE)
def test_damaged_tokenizer_cache_is_rebuilt(kind, fresh, tmp_path):
    cache = shutil.copytree(fresh[0], tmp_path / "cache")
    (entry,) = cache.glob("bpe-*")
    (tokens,) = cache.glob("tokens-*")
    damage, says = TOKENIZER_DAMAGE[kind]
    damage(entry)
    d, logs = prepare(cache)
    damaged = [s for s in logs if "is damaged (" in s]
    assert len(damaged) == 1 and damaged[0].startswith(f"data: the cached tokenizer in {entry} is damaged ({says}")
    assert damaged[0].endswith("; rebuilding it") and any("training a byte-level BPE" in s for s in logs)
    assert d.tokenizer.get_vocab() == fresh[3]  # the same tokenizer again, so the same tokens,
    assert logs[-1] == f"data: using cached tokens in {tokens}"  # which were fine and are kept
    assert np.array_equal(d.train, fresh[1]) and np.array_equal(d.val, fresh[2])


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_dead_runs_are_cleaned_live_ones_kept(fresh, tmp_path):
    cache = shutil.copytree(fresh[0], tmp_path / "cache")
    # a real one: a process that starts building an entry and is killed with SIGKILL
    killed = subprocess.run([sys.executable, "-c", "import os, sys; from pathlib import Path; sys.path.insert(0, "
                             f"{str(ROOT)!r}); import data; t = data._tmp_dir(Path({str(cache)!r}) / 'tokens-x'); "
                             "t.mkdir(); (t / 'train.bin').write_bytes(b'12'); os.kill(os.getpid(), 9)"])
    assert killed.returncode == -9
    dead, host = dead_pid(), data.HOST
    names = {f".tmp-{dead}@{host}-tokens-a": False, f".tmp-{dead}-tokens-from-an-older-version": False,
             f".tmp-{os.getpid()}@{host}-tokens-b": True,  # this process is alive: kept
             f".tmp-{dead}@0another-tokens-c": True,  # another machine's PIDs mean nothing here: kept,
             f".tmp-{dead}@0another-tokens-d": False}  # until untouched for a day
    for name in names:
        (cache / name).mkdir()
        (cache / name / "train.bin").write_bytes(b"\0" * 10)
    day_old = time.time() - data.TMP_MAX_AGE - 60
    for p in (cache / f".tmp-{dead}@0another-tokens-d", cache / f".tmp-{dead}@0another-tokens-d" / "train.bin"):
        os.utime(p, (day_old, day_old))
    (leftover,) = [p for p in cache.glob(".tmp-*") if p.name not in names]  # the killed process's
    assert leftover.name.endswith(f"@{host}-tokens-x") and (leftover / "train.bin").exists()
    d, logs = prepare(cache)
    assert logs[0] == f"data: removed 4 temporary folder(s) of interrupted runs from {cache}"
    assert logs[1:] == [f"data: using cached tokens in {next(cache.glob('tokens-*'))}"]
    assert sorted(p.name for p in cache.glob(".tmp-*")) == sorted(n for n, kept in names.items() if kept)


# %% one-line messages


def test_broken_jsonl_line_is_named_once(tmp_path, capfd):
    lines = [json.dumps({"text": f"Document {i}. " + "Some words in a row. " * 20}) for i in range(4000)]
    lines[3210] = '{"text": "a string that never ends'
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(data.DataError) as e:
        data.load_documents(data.parse_source(str(path)), "text", None)
    message = f"cannot read {path}: line 3211 is not valid JSON (Unterminated string starting at column 10)"
    assert str(e.value) == message
    assert capfd.readouterr().err == ""  # datasets' own log line (with a block-relative row) is silenced
    code = train.main(["--data", str(path), "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "out"),
                       "--device", "cpu"])
    assert code == 1 and capfd.readouterr().err == f"error: {message}\n"


def json_says(line: bytes) -> str:
    """json's own words and column for a line that does not parse: they vary by Python (a trailing
    comma: "Expecting property name enclosed in double quotes" at 14 in 3.11, "Illegal trailing
    comma before end of object" at 13 in 3.13)."""
    with pytest.raises(json.JSONDecodeError) as e:
        json.loads(line)
    return f"{e.value.msg} at column {e.value.colno}"


def test_json_error_finds_the_line(tmp_path):
    trailing_comma = b'{"text": "y",}'
    cases = {"a.jsonl": (b'{"text": "x"}\n\n{"text": "\xff"}\n', "line 3 is not UTF-8 text"),
             "b.jsonl": (b'{"text": "x"}\n{"text": "y"} 5\n', "line 2 is not valid JSON (Extra data at column 15)"),
             "c.json": (b'{\n  "text": "x",\n  "y":\n}\n', "line 4 is not valid JSON (Expecting value at column 1)"),
             "d.json": (json.dumps({"text": ["x", "y"]}, indent=2).encode(), None),  # one valid document
             "e.json": (b'{"text": "x"}\n' + trailing_comma + b"\n",
                        f"line 2 is not valid JSON ({json_says(trailing_comma)})")}
    for name, (content, want) in cases.items():
        (tmp_path / name).write_bytes(content)
        assert data.json_error(tmp_path / name) == want, name


def test_empty_tokenizer_folder(tmp_path, capfd):
    empty = tmp_path / "tok"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a tokenizer")
    with pytest.raises(UserError, match=f"^no tokenizer files in {empty} \\(looked for tokenizer.json, "):
        data.load_tokenizer(str(empty))
    code = train.main(["--tokenizer", str(empty), "--data", "embedded", "--max-docs", "20", "--device", "cpu",
                       "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "out")])
    err = capfd.readouterr().err
    assert code == 1 and err.startswith(f"error: no tokenizer files in {empty} (") and err.count("\n") == 1
