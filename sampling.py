"""
What generate.py and its interactive prompt (interactive.py) share: the sampling settings and their
ranges, a prompt as the token ids the model gets, and new tokens printed as text as soon as they are
text (with, on request, the distribution each was drawn from). How a token is drawn is qwen3.py's
(its Sampling section); this file only feeds it and prints what comes out.
"""
import math
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tokenizers import decoders

from common import UserError
from data import byte_level_alphabet

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
# a prompt as token ids


def encode(tokenizer, prompt, chat=False, think=True):
    """Token ids for a prompt: a string, or with chat=True the list of messages so far
    (ending with the user's turn), rendered by the tokenizer's chat template."""
    if chat:
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=think)
        return tokenizer.encode(text, add_special_tokens=False)
    ids = tokenizer.encode(prompt)
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
        notes.append(f"the prompt has {len(ids)} tokens: keeping the last {keep}, so that {max_new_tokens} "
                     f"new tokens fit the model's context of {context}")
        ids = ids[-keep:]
    return ids, max_new_tokens, "note: " + "; ".join(notes) if notes else None


def prompt_ids(tokenizer, prompt, settings, context, chat=False, show_prompt=False):
    """The token ids the model gets for a prompt, cut to leave room in the context for the new
    tokens, and how many new tokens fit: (ids, max_new_tokens). A cut is noted on stderr, and
    show_prompt prints the ids as text there too."""
    ids = encode(tokenizer, prompt, chat, settings.think)
    ids, max_new_tokens, note = fit_context(ids, settings.max_new_tokens, context)
    if note:
        print(note, file=sys.stderr)
    if show_prompt:
        print(f"--- prompt ({len(ids)} tokens) ---\n{tokenizer.decode(ids)}\n---", file=sys.stderr)
    return ids, max_new_tokens


# -----------------------------------------------------------------------------
# new tokens as text


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
    """Print the new tokens that qwen3.stream yields as text as soon as they are text, after the
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
