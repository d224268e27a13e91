"""
Sample text from a Qwen3 checkpoint: one of our training runs, or any Hugging Face Qwen3 directory.

    python generate.py                                   # interactive prompt on out/best
    python generate.py --prompt "Once upon a time" -n 100 --num-samples 3
    echo "Once upon a time" | python generate.py --prompt -
    python generate.py --ckpt path/to/Qwen3-0.6B --chat  # chat through the tokenizer's chat template
    python generate.py --prompt "The city of" --show-probs  # each token with its likeliest candidates
    python generate.py --prompt "Once" --prompt "The sea"   # several prompts, decoded as one batch
    python generate.py --prompt-file prompts.txt          # one prompt per line, one batch

The prompt is run through the model once to fill a KV cache (prefill); after that each step feeds
only the newest token (Qwen3.stream / Qwen3.generate in qwen3.py).
"""
import argparse
import json
import math
import os
import sys
import time

import torch
from tokenizers import decoders
from transformers import AutoTokenizer

from data import byte_level_alphabet
from engine import Engine
from qwen3 import CheckpointError, from_pretrained, generate, stream


class GenerateError(Exception):
    """Bad input from the user: reported as one line, never as a traceback."""


# -----------------------------------------------------------------------------
# settings shared by the command line and the interactive /commands

RULES = {  # setting: (is the value allowed, what is allowed)
    "max_new_tokens": (lambda v: v >= 1, "max new tokens (-n) must be >= 1"),
    "temperature": (lambda v: math.isfinite(v) and v >= 0, "temperature must be a number >= 0 (0 = greedy)"),
    "top_k": (lambda v: v >= 0, "top-k must be >= 0 (0 = off)"),
    "top_p": (lambda v: 0 < v <= 1, "top-p must be in (0, 1] (1 = off)"),
    "num_samples": (lambda v: v >= 1, "--num-samples must be >= 1"),
    "seed": (lambda v: v is None or -2**63 <= v < 2**64, "the seed must be an integer in [-2**63, 2**64)"),  # torch's
}

COMMANDS = {  # /command: (setting, type of its value)
    "/n": ("max_new_tokens", int),
    "/temp": ("temperature", float),
    "/topk": ("top_k", int),
    "/topp": ("top_p", float),
    "/seed": ("seed", int),
}

HELP = """\
Type a prompt and press Enter; the continuation streams as it is generated. Lines starting with / are commands:
  /temp T         temperature (0 = greedy)
  /topk K         sample only from the K most likely tokens (0 = off)
  /topp P         sample only from the most likely tokens holding probability mass P, in (0, 1] (1 = off)
  /n N            max new tokens per generation
  /seed S         reseed the sampler (what follows is reproducible)
  /probs on|off   a line per new token: its likeliest candidates and their probabilities after temperature,
                  top-k and top-p (* marks the token drawn); the text follows
  /tokens         how the last prompt was split into tokens (ids and pieces, as the model got it)
{chat}  /settings       show the current settings
  /help           show this help
  /quit           leave (so do Ctrl-D and Ctrl-C at the prompt; Ctrl-C during a generation stops it)
{empty}"""

HELP_CHAT = """\
  /think on|off   let the model think before it answers (Qwen3's enable_thinking)
  /reset          forget the conversation so far
"""


def help_text(chat):
    if chat:
        return HELP.format(chat=HELP_CHAT, empty='An empty line sends an empty message, as --prompt "" does.')
    return HELP.format(chat="", empty='An empty line samples unconditionally, from the start token alone, as '
                       '--prompt "" does.\nWith --chat there are /think and /reset too.')


def check(name, value):
    allowed, rule = RULES[name]
    if not allowed(value):
        raise GenerateError(f"{rule}, got {value}")


def on_off(flag):
    return "on" if flag else "off"


def show_settings(s, chat):
    seed = "random" if s["seed"] is None else s["seed"]
    return (f"settings: /temp {s['temperature']} /topk {s['top_k']} /topp {s['top_p']} /n {s['max_new_tokens']} "
            f"/seed {seed} /probs {on_off(s['show_probs'])}" + (f" /think {on_off(s['think'])}" if chat else ""))


# -----------------------------------------------------------------------------
# loading

def find_checkpoint(path):
    """A checkpoint dir holds config.json; a training run dir holds best/ and last/ checkpoints."""
    hint = "train one with `python train.py`, or pass --ckpt DIR"
    if not os.path.isdir(path):
        raise GenerateError(f"no checkpoint found at {path} ({hint})")
    for d in (path, os.path.join(path, "best"), os.path.join(path, "last")):
        if os.path.isfile(os.path.join(d, "config.json")):
            return d
    raise GenerateError(f"{path} is not a checkpoint: no config.json in it, nor in best/ or last/ ({hint})")


def pick_device(name):
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        name = "cuda" if available["cuda"] else "mps" if available["mps"] else "cpu"
    if not available[name]:
        raise GenerateError(f"--device {name}: no {name} device is available here")
    return torch.device(name)


def pick_dtype(name, device):
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":  # half the memory traffic of fp32; fp16 where the GPU lacks bf16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(ckpt):
    # without a vocabulary file transformers would quietly build an empty tokenizer from config.json
    if not any(os.path.isfile(os.path.join(ckpt, f)) for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise GenerateError(f"{ckpt} has no tokenizer (no tokenizer.json, tokenizer.model or vocab.json)")
    try:  # local files only; never trust_remote_code
        return AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
    except Exception as e:  # transformers and tokenizers raise many kinds for missing or broken files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GenerateError(f"cannot load the tokenizer in {ckpt}: {msg}") from None


def stop_ids(tokenizer, model, ckpt):
    """Token ids that end a generation: the tokenizer's EOS plus the eos_token_id(s) of the
    checkpoint's config.json and generation_config.json (Qwen3 lists <|endoftext|> there too)."""
    found = [tokenizer.eos_token_id, model.config.eos_token_id]
    path = os.path.join(ckpt, "generation_config.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                found.append(json.load(f).get("eos_token_id"))
        except (OSError, ValueError, AttributeError) as e:
            raise GenerateError(f"{path} is not a readable JSON object ({type(e).__name__})") from None
    ids = set()
    for x in found:
        ids.update(x if isinstance(x, list) else [] if x is None else [x])
    return sorted(ids)


def load(args):
    ckpt = find_checkpoint(args.ckpt)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model = from_pretrained(ckpt, dtype=dtype, device=device)  # first: it vets config.json
    model.eval()
    tokenizer = load_tokenizer(ckpt)
    if len(tokenizer) > model.config.vocab_size:
        raise GenerateError(f"the tokenizer in {ckpt} has {len(tokenizer)} tokens but the model's embedding has "
                            f"only {model.config.vocab_size} (config.json vocab_size): they do not belong together")
    if args.chat and not tokenizer.chat_template:
        raise GenerateError(f"--chat: the tokenizer in {ckpt} has no chat template (not an instruct model); "
                            f"leave out --chat")
    return ckpt, model, tokenizer, stop_ids(tokenizer, model, ckpt)


# -----------------------------------------------------------------------------
# prompts and generation

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
            raise GenerateError("the prompt is empty and the tokenizer has no BOS or EOS token to start from")
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


# -----------------------------------------------------------------------------
# looking inside: the tokens of a prompt, the candidates for each new token

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


def show_tokens(tokenizer, ids):
    """/tokens: the prompt the model got, one token a line, and a note when it ends mid-word
    (a chat template's prompt never does: it ends with the assistant's header)."""
    lines = [f"{len(ids)} tokens (the last prompt, as the model got it):"]
    lines += [f"{i:5d} {t:7d}  {token_piece(tokenizer, t)}" for i, t in enumerate(ids)]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if text[-1:].isalnum():
        lines.append("note: the prompt ends in a letter or digit, so to the model its last word may not be over: "
                     "the continuation may extend it (Paris into Parisk); a prompt ending in a space or punctuation "
                     "is tokenized, and continued, differently")
    return "\n".join(lines)


def show_prob(p):
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def probs_line(tokenizer, token, probs, k=5):
    """/probs: the token drawn, then the k likeliest candidates of the distribution it was drawn
    from (only those it could have been: probability > 0), * marking the drawn one (added last when
    it is not among them)."""
    top = probs.topk(min(k, probs.numel()))
    shown = [(t, p) for t, p in zip(top.indices.tolist(), top.values.tolist()) if p > 0]
    if token not in [t for t, _ in shown]:
        shown.append((token, probs[token].item()))
    candidates = " | ".join(f"{'*' if t == token else ''}{token_piece(tokenizer, t)} {show_prob(p)}" for t, p in shown)
    return f"{token_piece(tokenizer, token):<12} {candidates}"


def complete(model, tokenizer, ids, s, stop, generator, echo, out=None, probs=False):
    """Stream one continuation of the prompt ids to `out` (after the prompt itself if echo).
    With probs, each new token gets a line (probs_line) and the text waits to the end, so that the
    two never interleave. Ctrl-C stops it early. Returns (new token ids, seconds to the first token,
    seconds in all, interrupted)."""
    out = out or sys.stdout
    idx = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    text, held = TextStream(tokenizer, ids), []
    write = held.append if probs else out.write
    if echo:
        write(tokenizer.decode(ids, skip_special_tokens=True))
    new, first, interrupted = [], None, False
    t0 = time.perf_counter()
    try:
        for step in stream(model, idx, s["max_new_tokens"], temperature=s["temperature"], top_k=s["top_k"],
                           top_p=s["top_p"], eos_token_id=stop, generator=generator, with_probs=probs,
                           decoder=Engine(model)):
            token, dist = step if probs else (step, None)
            if first is None:
                first = time.perf_counter() - t0
            new.append(token)
            write(text.push(token))
            if probs:
                out.write(probs_line(tokenizer, token, dist) + "\n")
            out.flush()
    except KeyboardInterrupt:
        interrupted = True
    write(text.flush())
    out.write("".join(held))
    out.flush()
    return new, first, time.perf_counter() - t0, interrupted


def make_generator(device, seed):
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def prepare(model, tokenizer, prompt, s, chat, show_prompt):
    """Prompt -> token ids that fit the context, with the note and --show-prompt output on stderr."""
    ids = encode(tokenizer, prompt, chat, s["think"])
    ids, max_new_tokens, note = fit_context(ids, s["max_new_tokens"], model.config.max_position_embeddings)
    if note:
        print(note, file=sys.stderr)
    if show_prompt:
        print(f"--- prompt ({len(ids)} tokens) ---\n{tokenizer.decode(ids)}\n---", file=sys.stderr)
    return ids, dict(s, max_new_tokens=max_new_tokens)


# -----------------------------------------------------------------------------
# the two modes

def read_prompts(args):
    """--prompt (repeatable; "-" reads stdin) and --prompt-file (one prompt per line), in order."""
    prompts = [sys.stdin.read().removesuffix("\n") if p == "-" else p for p in args.prompt or []]
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\r\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise GenerateError(f"--prompt-file {args.prompt_file}: {e.strerror or e}") from None
        if not prompts:
            raise GenerateError(f"--prompt-file {args.prompt_file} holds no prompt (one per line)")
    return prompts


def one_batch(args, model, tokenizer, stop, s, prompts):
    """Several prompts (each --num-samples times) left-padded into one batch for Qwen3.generate;
    each continuation is printed when all are done, separated by a line."""
    if s["show_probs"]:
        raise GenerateError("--show-probs takes one prompt")
    prepared = [prepare(model, tokenizer, [{"role": "user", "content": p}] if args.chat else p, s, args.chat,
                        args.show_prompt) for p in prompts for _ in range(args.num_samples)]
    n = min(settings["max_new_tokens"] for _, settings in prepared)
    T = max(len(ids) for ids, _ in prepared)
    device = next(model.parameters()).device
    idx = torch.tensor([[0] * (T - len(ids)) + ids for ids, _ in prepared], device=device)  # left padding
    mask = torch.tensor([[0] * (T - len(ids)) + [1] * len(ids) for ids, _ in prepared], device=device)
    out = generate(model, idx, n, temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"],
                   eos_token_id=stop, generator=make_generator(device, s["seed"]), attention_mask=mask,
                   decoder=Engine(model))
    for i, ((ids, _), row) in enumerate(zip(prepared, out[:, T:].tolist())):
        new = row[:next((j for j, t in enumerate(row) if t in stop), len(row))]  # up to the first stop
        if i:
            print("---------------")
        print(tokenizer.decode(new if args.chat else ids + new, skip_special_tokens=True))


def one_shot(args, model, tokenizer, stop, s):
    prompts = read_prompts(args)
    if len(prompts) > 1:
        return one_batch(args, model, tokenizer, stop, s, prompts)
    prompt = prompts[0]
    ids, s = prepare(model, tokenizer, [{"role": "user", "content": prompt}] if args.chat else prompt,
                     s, args.chat, args.show_prompt)
    generator = make_generator(next(model.parameters()).device, s["seed"])
    for i in range(args.num_samples):
        if i:
            print("---------------")
        interrupted = complete(model, tokenizer, ids, s, stop, generator, echo=not args.chat,
                               probs=s["show_probs"])[3]
        print()
        if interrupted:
            sys.exit(130)


def switch(name, values, now):
    if values not in (["on"], ["off"]):
        raise GenerateError(f"usage: {name} on|off (now {on_off(now)})")
    return values == ["on"]


def run_command(line, s, generator, history, chat, tokenizer, last_ids):
    """Apply one /command to the settings; True means quit. Bad commands raise GenerateError.
    last_ids: the token ids of the last prompt, as the model got it (None before the first)."""
    name, *values = line.split()
    if name in ("/quit", "/exit", "/q"):
        return True
    if name == "/help":
        print(help_text(chat))
    elif name == "/settings":
        print(show_settings(s, chat))
    elif name == "/tokens":
        print("no prompt yet: /tokens shows how the last one was split" if last_ids is None
              else show_tokens(tokenizer, last_ids))
    elif name == "/probs":
        s["show_probs"] = switch(name, values, s["show_probs"])
        print(show_settings(s, chat))
    elif name == "/reset":
        history.clear()
        print("conversation cleared" if chat else "nothing to reset: each prompt stands alone without --chat")
    elif name == "/think":
        if not chat:
            raise GenerateError("/think applies only to --chat (it switches the chat template's thinking)")
        s["think"] = switch(name, values, s["think"])
        print(show_settings(s, chat))
    elif name in COMMANDS:
        key, kind = COMMANDS[name]
        if len(values) != 1:
            raise GenerateError(f"usage: {name} VALUE (now {s[key]})")
        try:
            value = kind(values[0])
        except ValueError:
            needs = "an integer" if kind is int else "a number"
            raise GenerateError(f"{name} needs {needs}, got {values[0]!r}") from None
        if key in RULES:
            check(key, value)
        s[key] = value
        if key == "seed":
            generator.manual_seed(value)
        print(show_settings(s, chat))
    else:
        raise GenerateError(f"unknown command {name}; /help lists the commands")
    return False


def interactive(args, ckpt, model, tokenizer, stop, s):
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (importing it gives input() line editing and history)
        except ImportError:
            pass
    device = next(model.parameters()).device
    generator = make_generator(device, s["seed"])
    history, last_ids = [], None  # the conversation (with --chat); the last prompt's token ids
    print(f"Qwen3 with {model.num_params():,} parameters from {ckpt} on {device} "
          f"({next(model.parameters()).dtype}){', chat mode' if args.chat else ''}. /help lists the commands.")
    print(show_settings(s, args.chat))
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C at the prompt leave
            print()
            return
        if line.startswith("/"):
            try:
                if run_command(line, s, generator, history, args.chat, tokenizer, last_ids):
                    return
            except GenerateError as e:
                print(f"error: {e}", file=sys.stderr)
            continue
        if args.chat:
            history.append({"role": "user", "content": line})
        # an empty line is a prompt too: unconditional samples (or an empty message), as with --prompt ""
        last_ids, gen_settings = prepare(model, tokenizer, history if args.chat else line, s, args.chat,
                                         args.show_prompt)
        new, first, seconds, interrupted = complete(model, tokenizer, last_ids, gen_settings, stop, generator,
                                                    echo=False, probs=s["show_probs"])
        print("\n[stopped]" if interrupted else "")
        if args.chat:
            history.append({"role": "assistant", "content": tokenizer.decode(new, skip_special_tokens=True)})
        if new:  # decoding speed: the steps after the first token (whose time includes the prefill)
            rate = f", {(len(new) - 1) / (seconds - first):.1f} tokens/s" if len(new) > 1 else ""
            print(f"[{len(new)} tokens{rate}, first token after {first:.2f}s]")
        else:
            print("[no tokens: the model ended at once]")


# -----------------------------------------------------------------------------

def get_parser():
    p = argparse.ArgumentParser(description="Sample from a Qwen3 checkpoint: one-shot with --prompt, "
                                "else an interactive prompt (/help inside lists its commands).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default="out", help="checkpoint dir (config.json, model.safetensors, tokenizer files; "
                   "any Hugging Face Qwen3 dir) or a training run dir (uses its best/, else its last/)")
    p.add_argument("--prompt", default=None, action="append", help='generate from this prompt, print and exit ("-" '
                   'reads it from stdin, "" samples unconditionally); repeat it for several prompts, decoded as '
                   'one batch; without it (or --prompt-file), open the interactive prompt')
    p.add_argument("--prompt-file", default=None, help="a text file of prompts, one per line (blank lines "
                   "skipped), decoded as one batch, after any --prompt")
    p.add_argument("-n", "--max-new-tokens", type=int, default=100, help="max new tokens per generation")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample only from the k most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=0.95, help="sample only from the smallest set of most likely "
                   "tokens holding probability mass >= p; 1 = off")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed for reproducible samples (None: a fresh seed each run)")
    p.add_argument("--num-samples", type=int, default=1, help="with --prompt: how many samples to draw")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template "
                   "(instruct models such as Qwen3) and, interactively, keep the conversation")
    p.add_argument("--think", action=argparse.BooleanOptionalAction, default=True,
                   help="with --chat: let the model think before it answers (Qwen3's enable_thinking)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto: cuda, else mps, else cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on cuda (float16 if unsupported), float32 elsewhere; on x86 CPUs with "
                   "F16C, float16 reads half the bytes per token (README: Speed)")
    p.add_argument("--show-prompt", action="store_true",
                   help="print the exact prompt the model gets (chat template, truncation) to stderr")
    p.add_argument("--show-probs", action="store_true", help="with each new token, print a line to stdout: the "
                   "likeliest candidates and their probabilities after temperature, top-k and top-p (* marks the "
                   "token drawn); the text follows them (interactively: /probs on|off)")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    s = {k: getattr(args, k)
         for k in ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "think", "show_probs")}
    try:
        for name in RULES:
            check(name, getattr(args, name))
        ckpt, model, tokenizer, stop = load(args)
        if args.prompt is None and args.prompt_file is None:
            interactive(args, ckpt, model, tokenizer, stop, s)
        else:
            one_shot(args, model, tokenizer, stop, s)
    except (GenerateError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C while loading or reading stdin
        sys.exit(130)


if __name__ == "__main__":
    main()
