"""
What generate.py and its interactive prompt (interactive.py) share: the sampling settings and their
ranges, text as it comes in, a prompt as the token ids the model gets, and new tokens printed as
text as soon as they are text (with, on request, the distribution each was drawn from). How a token
is drawn is qwen3.py's (its Sampling section); this file feeds it, streams its tokens one at a time
(stream) and prints what comes out.
"""
import io
import math
import os
import re
import select
import signal
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tokenizers import decoders

from common import UserError, one_line, split_text
from data import byte_level_alphabet
from guards import check_decoding
from qwen3 import eos_ids, next_tokens

# -----------------------------------------------------------------------------
# settings: generate.py's flags, which the interactive prompt's /commands change


@dataclass
class Settings:
    max_new_tokens: int
    temperature: float  # 0 = greedy
    top_k: int  # 0 = off
    top_p: float  # 1 = off
    seed: int | None  # None: a fresh seed each run
    think: bool  # with --chat: Qwen3's enable_thinking
    show_probs: bool  # a line per new token: its likeliest candidates


RULES = {  # flag or setting: (is the value allowed, what is allowed)
    "max_new_tokens": (lambda v: v >= 1, "max new tokens (-n) must be >= 1"),
    "temperature": (lambda v: math.isfinite(v) and v >= 0, "temperature must be a number >= 0 (0 = greedy)"),
    "top_k": (lambda v: v >= 0, "top-k must be >= 0 (0 = off)"),
    "top_p": (lambda v: 0 < v <= 1, "top-p must be in (0, 1] (1 = off)"),
    "num_samples": (lambda v: v >= 1, "--num-samples must be >= 1"),
    "seed": (lambda v: v is None or -2**63 <= v < 2**64, "the seed must be an integer in [-2**63, 2**64)"),  # torch's
}


def check(name, value):
    allowed, rule = RULES[name]
    if not allowed(value):
        raise UserError(f"{rule}, got {value}")


def make_generator(device, seed):
    """The random numbers every sample of a run draws from, one after another (seed None: a fresh seed)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


# -----------------------------------------------------------------------------
# text as it comes in: --prompt, stdin, --prompt-file, the interactive prompt
#
# All of it must be UTF-8. Each source decodes with errors="surrogateescape" (Python decodes argv so
# itself), which turns an invalid byte into a lone surrogate character, and utf8() refuses text that
# holds one, in one line naming where. Streams are read a piece at a time, and a prompt keeps only
# its last TAIL_CHARS characters: a prompt file of one 50 MB line costs a few MB, not gigabytes, and
# /dev/zero (no line break, ever) is refused once TEXT_CHARS characters have gone by.

TAIL_CHARS = 2**22  # what a prompt keeps at most: its last 4 Mi characters, more than any context holds
TEXT_CHARS = 2**28  # a line (or stdin read as one prompt) longer than this is refused


def utf8_stdin():
    """Read stdin as UTF-8 whatever the locale says, with invalid bytes left for utf8() to find."""
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(encoding="utf-8", errors="surrogateescape")


def utf8(text: str, where: str) -> str:
    """Text as it enters, if it is UTF-8 (no lone surrogate: see above); else UserError."""
    bad = re.search("[\ud800-\udfff]", text)
    if bad:
        char = bad.group()
        what = f"byte 0x{ord(char) - 0xdc00:02x}" if "\udc80" <= char <= "\udcff" else "a lone surrogate"
        raise UserError(f"{where} is not UTF-8 text ({what} at character {bad.start() + 1}); text must be UTF-8")
    return text


def read_text(stream, where: str, line: bool = True) -> str | None:
    """One line of a text stream (with its line break), or with line=False all that is left of it:
    its last TAIL_CHARS characters, read a piece at a time so that no more is ever held. None at the
    end of the stream (line=True). More than TEXT_CHARS characters in one line is a UserError."""
    text, seen = "", 0
    while seen <= TEXT_CHARS:
        chunk = stream.readline(TAIL_CHARS) if line else stream.read(TAIL_CHARS)
        if not chunk:
            return None if line and not seen else text
        seen += len(chunk)
        text = (text + chunk)[-TAIL_CHARS:]
        if line and chunk.endswith("\n"):
            return text
    raise UserError(f"{where} runs past {TEXT_CHARS:,} characters{' in one line' if line else ''}; not read "
                    f"further (a prompt keeps only its last {TAIL_CHARS:,})")


# -----------------------------------------------------------------------------
# a prompt as token ids
#
# A chat template is a program that comes with the checkpoint. transformers runs it sandboxed (no
# files, no imports, no Python objects' insides), yet it can still loop for hours or build a string
# of gigabytes ('x' * 10**10). So it runs in a child process (a fork: nothing is loaded again) that is
# given TEMPLATE_SECONDS and TEMPLATE_BYTES of memory beyond what this process holds, and may hand
# back at most template_chars(messages) characters; past any of these it is refused, in one line.
# Where there is no fork (Windows) it runs in this process, without them.

TEMPLATE_SECONDS = 10  # templates render in milliseconds
TEMPLATE_BYTES = 2**30


def template_chars(messages) -> int:
    """The longest text a chat template may make of `messages`: theirs four times over, plus 64 Ki."""
    return 2**16 + 4 * sum(len(str(m.get("content", ""))) for m in messages)


def _limit_memory(extra: int):
    """Let this process map at most `extra` bytes more than it does now (Linux: /proc/self/statm)."""
    try:
        import resource
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (ImportError, OSError, ValueError):
        return
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    limit = mapped + extra if hard == resource.RLIM_INFINITY else min(mapped + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def render_chat(tokenizer, messages, think) -> str:
    """The chat template's text for `messages`, with the budget above."""
    def render():
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=think)
    most = template_chars(messages)
    if not hasattr(os, "fork"):
        return render()
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: render, hand the text (or why not) back, leave without the parent's exit code
        status = 1
        try:
            os.close(reader)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
            _limit_memory(TEMPLATE_BYTES)
            text = render()
            if len(text) > most:
                raise UserError(f"made {len(text):,} characters of {most:,} at most")
            payload, status = text.encode("utf-8", "surrogatepass"), 0
        except MemoryError:
            payload = f"took more than {TEMPLATE_BYTES:,} bytes of memory".encode()
        except BaseException as e:  # whatever a template raises
            payload = one_line(e).encode("utf-8", "backslashreplace")
        try:
            with os.fdopen(writer, "wb") as f:
                f.write(payload)
        finally:
            os._exit(status)
    os.close(writer)
    chunks, deadline = [], time.monotonic() + TEMPLATE_SECONDS
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([reader], [], [], left)[0]:
                raise UserError(f"the chat template ran for more than {TEMPLATE_SECONDS} s; stopped")
            chunk = os.read(reader, 2**20)
            if not chunk:
                break
            chunks.append(chunk)
        _, status = os.waitpid(pid, 0)
        pid = 0  # reaped
    finally:
        os.close(reader)
        if pid:  # out of time, or Ctrl-C: the child goes
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    payload = b"".join(chunks)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return payload.decode("utf-8", "surrogatepass")
    why = (payload.decode(errors="replace") if os.WIFEXITED(status)
           else f"killed by {signal.Signals(os.WTERMSIG(status)).name}")
    raise UserError(f"the chat template failed: {why}")


PIECE_CHARS = 2**12  # a long prompt is tokenised from its end, this many characters at a time


def last_tokens(tokenizer, text, most=None, **kwargs):
    """text's token ids; or, when it holds more than `most`, at least its last `most`, without
    tokenising more of it than that takes: its pieces (common.split_text: each tokenises as inside
    the whole) from the end, until they hold more. The special tokens a tokenizer adds around a whole
    text are not added to a cut one (those at its start would be cut anyway)."""
    pieces, ids = split_text(text, PIECE_CHARS) if most is not None else [text], []
    for piece in reversed(pieces[1:]):
        ids[:0] = tokenizer.encode(piece, add_special_tokens=False)
        if len(ids) > most:
            return ids
    return tokenizer.encode(text, **kwargs)


def encode(tokenizer, prompt, chat=False, think=True, most=None):
    """Token ids for a prompt: a string, or with chat=True the list of messages so far
    (ending with the user's turn), rendered by the tokenizer's chat template (render_chat). With
    `most`, a long prompt is tokenised only as far back as its last `most` tokens take."""
    if chat:
        return last_tokens(tokenizer, render_chat(tokenizer, prompt, think), most, add_special_tokens=False)
    ids = last_tokens(tokenizer, prompt, most)
    if not ids:  # an empty prompt: start from BOS, or from EOS (which also separates documents)
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise UserError("the prompt is empty and the tokenizer has no BOS or EOS token to start from")
        ids = [start]
    return ids


def fit_context(ids, max_new_tokens, context):
    """Keep the most recent prompt tokens so that prompt + new tokens fit the model's context.
    Returns (ids, max_new_tokens, a note for the user or None)."""
    notes = []
    if max_new_tokens >= context:  # no room for the prompt: it keeps up to half the context
        max_new_tokens = context - min(len(ids), context // 2)
        notes.append(f"generating at most {max_new_tokens} new tokens (the model's context is {context})")
    keep = context - max_new_tokens
    if len(ids) > keep:
        notes.append(f"the prompt is longer than {keep} tokens: keeping the last {keep}, so that {max_new_tokens} "
                     f"new tokens fit the model's context of {context}")
        ids = ids[-keep:]
    return ids, max_new_tokens, "note: " + "; ".join(notes) if notes else None


def prompt_ids(tokenizer, prompt, settings, context, chat=False, show_prompt=False):
    """The token ids the model gets for a prompt, cut to leave room in the context for the new
    tokens, and how many new tokens fit: (ids, max_new_tokens). A cut is noted on stderr, and
    show_prompt prints the ids as text there too."""
    ids = encode(tokenizer, prompt, chat, settings.think, most=context)
    ids, max_new_tokens, note = fit_context(ids, settings.max_new_tokens, context)
    if note:
        print(note, file=sys.stderr)
    if show_prompt:
        print(f"--- prompt ({len(ids)} tokens) ---\n{tokenizer.decode(ids)}\n---", file=sys.stderr)
    return ids, max_new_tokens


# -----------------------------------------------------------------------------
# new tokens, one at a time, as text


def stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token_id=None,
           generator=None, with_probs=False, decoder=next_tokens):
    """Like qwen3.generate for one sequence (1, T), but yields each new token id as soon as it exists,
    stopping at EOS without yielding it; with_probs, (id, the distribution (vocab,) it was drawn
    from). Bad arguments raise at the call, not at the first token."""
    check_decoding(model.config.max_position_embeddings, idx, max_new_tokens, temperature, top_k, top_p, None)
    if idx.size(0) != 1:
        raise ValueError(f"stream takes one sequence, shape (1, T), got {tuple(idx.shape)}: use generate for batches")
    eos = set(eos_ids(eos_token_id))

    def tokens():
        for token, probs in decoder(model, idx, max_new_tokens, temperature, top_k, top_p, generator, None,
                                    with_probs):
            if token.item() in eos:
                return
            yield (token.item(), probs[0]) if with_probs else token.item()
    return tokens()


class TextStream:
    """Turns a growing list of token ids into text pieces as soon as they are printable.

    One character can span several tokens (byte-level BPE splits UTF-8), so a piece whose text ends in
    the replacement character waits for the next token. Each step decodes from a few tokens back,
    not from the start: constant cost per token, and the left context that some tokenizers need to
    place spaces right."""

    def __init__(self, tokenizer, context_ids):
        self.tokenizer = tokenizer
        self.ids = list(context_ids)
        self.start = max(0, len(self.ids) - 5)  # decode from here
        self.done = len(self.ids)               # text up to this token has been handed out

    def push(self, token_id):
        self.ids.append(token_id)
        return self._piece(final=False)

    def flush(self):
        return self._piece(final=True)

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _piece(self, final):
        before, now = self._decode(self.ids[self.start:self.done]), self._decode(self.ids[self.start:])
        if len(now) <= len(before) or (now.endswith("\ufffd") and not final):
            return ""
        self.start, self.done = self.done, len(self.ids)
        return now[len(before):]


BYTE_OF = byte_level_alphabet()  # byte-level BPE's stand-in characters -> bytes (data.py)


def token_piece(tokenizer, token_id):
    r"""One token as text the terminal shows faithfully: quoted, so spaces and newlines are visible
    (' the', '\n'); as bytes (b'\xe6\x97') where byte-level BPE cut a character apart; special tokens
    bare; <id N> for an id the tokenizer lacks (a padded embedding row)."""
    token = tokenizer.convert_ids_to_tokens(token_id)
    if token is None:
        return f"<id {token_id}>"
    if token_id in tokenizer.added_tokens_decoder:  # <|endoftext|>, <think>: stored as they read
        return token
    if isinstance(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None), decoders.ByteLevel):
        raw = bytes(BYTE_OF[c] for c in token)
        try:
            return repr(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return repr(raw)
    return repr(tokenizer.decode([token_id]))


def show_prob(p):
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def probs_line(tokenizer, token, probs, k=5):
    """--show-probs and /probs: the token drawn, then the k likeliest candidates of the distribution
    it was drawn from (only those it could have been: probability > 0), * marking the drawn one
    (added last when it is not among them)."""
    top = probs.topk(min(k, probs.numel()))
    shown = [(t, p) for t, p in zip(top.indices.tolist(), top.values.tolist()) if p > 0]
    if token not in [t for t, _ in shown]:
        shown.append((token, probs[token].item()))
    candidates = " | ".join(f"{'*' if t == token else ''}{token_piece(tokenizer, t)} {show_prob(p)}" for t, p in shown)
    return f"{token_piece(tokenizer, token):<12} {candidates}"


class Continuation(NamedTuple):
    new_ids: list
    first_token_seconds: float | None  # the prompt's pass included
    seconds: float
    interrupted: bool  # by Ctrl-C


def print_tokens(tokens, tokenizer, ids, echo, probs, out=None):
    """Print the new tokens that stream yields as text as soon as they are text, after the
    prompt ids' own text if echo. probs: the tokens come as (id, distribution) and each gets a line
    (probs_line), while the text waits for the end so that the two never interleave. Ctrl-C stops
    it early."""
    out = out or sys.stdout
    text, held = TextStream(tokenizer, ids), []
    write = held.append if probs else out.write
    if echo:
        write(tokenizer.decode(ids, skip_special_tokens=True))
    new, first, interrupted = [], None, False
    start = time.perf_counter()
    try:
        for step in tokens:  # the first one waits for the prompt's pass
            token, distribution = step if probs else (step, None)
            if first is None:
                first = time.perf_counter() - start
            new.append(token)
            write(text.push(token))
            if probs:
                out.write(probs_line(tokenizer, token, distribution) + "\n")
            out.flush()
    except KeyboardInterrupt:
        interrupted = True
    write(text.flush())
    out.write("".join(held))
    out.flush()
    return Continuation(new, first, time.perf_counter() - start, interrupted)
