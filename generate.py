"""
Sample text from a Qwen3 checkpoint: one of our training runs, or any Hugging Face Qwen3 folder.

    python generate.py                                      # the interactive prompt (interactive.py) on out/
    python generate.py --prompt "And God said" -n 40 --num-samples 3
    echo "In the beginning" | python generate.py --prompt -
    python generate.py --prompt "The city of" -n 5 --show-probs     # each token with its likeliest candidates
    python generate.py --prompt "And it came to pass" --prompt "He was born in"   # one padded batch
    python generate.py --prompt-file prompts.txt -n 40      # one prompt per line, in batches
    python generate.py --prompt "It is a species of" --no-engine    # every token through qwen3.py's loop

The real Qwen3-0.6B: `hf download Qwen/Qwen3-0.6B --local-dir Qwen3-0.6B` (the CLI of huggingface_hub,
which transformers brings), then `python generate.py --ckpt Qwen3-0.6B --chat`.

For one prompt, main() loads the checkpoint, encodes the prompt, keeps what fits the context, and
sampling.stream yields the new tokens (one pass over the prompt fills the KV cache, each later step
feeds only the newest token), each printed as soon as it is text. They come from engine.Engine,
made once after loading, which computes qwen3.py's tokens faster; --no-engine sends them through
qwen3.next_tokens instead, the loop in qwen3.py's Sampling section.

Text, wherever it comes from (--prompt, stdin, --prompt-file, the interactive prompt), must be
UTF-8: text with an invalid byte is refused in one line saying where, and the interactive prompt
goes on (at a terminal, its line editing drops such bytes as they are typed). A prompt too long for
the context keeps its last tokens, and only its end is read and tokenised; a line of more than
256 Mi characters is refused. Several prompts go in batches of up to 64 rows.
"""
import argparse
import itertools
import json
import os
import sys
from dataclasses import fields

import torch

import interactive
from common import ArgumentParser, UserError, error, load_tokenizer, pick_device
from engine import Engine
from guards import CheckpointError
from qwen3 import from_pretrained, generate, next_tokens
from sampling import (RULES, Settings, check, make_generator, print_tokens, prompt_ids, read_text, stream, utf8,
                      utf8_stdin)

HF_DOWNLOAD = "hf download Qwen/Qwen3-0.6B --local-dir"  # the real Qwen3-0.6B, into a folder

# -----------------------------------------------------------------------------
# loading: the checkpoint, its tokenizer, and what ends a generation


def find_checkpoint(path, given):
    """A checkpoint folder holds config.json; a training run's folder holds best/ and last/ ones.
    given: the user named the path (--ckpt), so the hint is not to name one."""
    hint = (f"to get Qwen3-0.6B there: `{HF_DOWNLOAD} {path}`" if given else
            f"train one with `python train.py`, or pass --ckpt DIR; for Qwen3-0.6B: `{HF_DOWNLOAD} Qwen3-0.6B`, "
            f"then --ckpt Qwen3-0.6B --chat")
    if not os.path.isdir(path):
        raise UserError(f"no checkpoint at {path}: no such folder ({hint})")
    for folder in (path, os.path.join(path, "best"), os.path.join(path, "last")):
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder
    raise UserError(f"{path} is not a checkpoint: no config.json in it, nor in best/ or last/ ({hint})")


def pick_dtype(name, device):
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":  # half the memory traffic of fp32; fp16 where the GPU lacks bf16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


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
            raise UserError(f"{path} is not a readable JSON object ({type(e).__name__})") from None
    ids = set()
    for x in found:
        ids.update(x if isinstance(x, list) else [] if x is None else [x])
    return sorted(ids)


def load(args):
    """(the checkpoint's folder, the model in eval mode, its tokenizer, the token ids that end a generation)"""
    ckpt = find_checkpoint(args.ckpt or "out", given=args.ckpt is not None)
    device = pick_device(args.device)
    model = from_pretrained(ckpt, dtype=pick_dtype(args.dtype, device), device=device)  # first: it vets config.json
    tokenizer = load_tokenizer(ckpt, local_only=True)
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(f"the tokenizer in {ckpt} has {len(tokenizer)} tokens but the model's embedding has "
                        f"only {model.config.vocab_size} (config.json vocab_size): they do not belong together")
    if args.chat and not tokenizer.chat_template:
        raise UserError(f"--chat: the tokenizer in {ckpt} has no chat template (not an instruct model); "
                        f"leave out --chat")
    return ckpt, model, tokenizer, stop_ids(tokenizer, model, ckpt)


# -----------------------------------------------------------------------------
# generating: one prompt streams token by token; several go as one batch


def read_prompts(args):
    """--prompt (repeatable; "-" reads stdin) and --prompt-file (one prompt per line), in order;
    with --chat each is a user's message. None of them: [], the interactive prompt. Each is UTF-8
    text, read and kept as sampling.read_text does (its last characters)."""
    prompts = [utf8(read_text(sys.stdin, "stdin", line=False).removesuffix("\n"), "stdin") if p == "-"
               else utf8(p, "--prompt") for p in args.prompt or []]
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8", errors="surrogateescape") as f:
                for n in itertools.count(1):
                    where = f"--prompt-file {args.prompt_file}, line {n},"
                    line = read_text(f, where)
                    if line is None:
                        break
                    if line.strip():
                        prompts.append(utf8(line.rstrip("\r\n"), where))
        except OSError as e:
            raise UserError(f"--prompt-file {args.prompt_file}: {e.strerror or e}") from None
        if not prompts:
            raise UserError(f"--prompt-file {args.prompt_file} holds no prompt (one per line)")
    return [[{"role": "user", "content": p}] if args.chat else p for p in prompts]


def one_prompt(args, model, tokenizer, stop, decoder, settings, prompt):
    """Stream --num-samples continuations of one prompt, each after the prompt's own text (a chat's
    reply alone), drawn one after another from one generator."""
    ids, max_new_tokens = prompt_ids(tokenizer, prompt, settings, model.config.max_position_embeddings,
                                     args.chat, args.show_prompt)
    idx = torch.tensor([ids], device=model.lm_head.weight.device)  # (1, T): a batch of one
    generator = make_generator(idx.device, settings.seed)
    for i in range(args.num_samples):
        if i:
            print("---------------")
        tokens = stream(model, idx, max_new_tokens, temperature=settings.temperature, top_k=settings.top_k,
                        top_p=settings.top_p, eos_token_id=stop, generator=generator,
                        with_probs=settings.show_probs, decoder=decoder)
        interrupted = print_tokens(tokens, tokenizer, ids, echo=not args.chat, probs=settings.show_probs).interrupted
        print()
        if interrupted:
            sys.exit(130)


# A batch holds at most BATCH_ROWS rows and BATCH_TOKENS tokens (rows x (longest prompt + new
# tokens)): what its KV cache, activations and logits take stays bounded, however many prompts
# and samples are asked for.
BATCH_ROWS = 64
BATCH_TOKENS = 2**15


def batches(rows):
    """(ids, new tokens) rows in batches that fit BATCH_ROWS and BATCH_TOKENS (at least one row each)."""
    batch = []
    for row in rows:
        if batch and (len(batch) == BATCH_ROWS or (len(batch) + 1) * max(len(ids) + n for ids, n in [*batch, row])
                      > BATCH_TOKENS):
            yield batch
            batch = []
        batch.append(row)
    if batch:
        yield batch


def one_batch(args, model, tokenizer, stop, decoder, settings, prompts):
    """Several prompts, each --num-samples times, left-padded into batches for qwen3.generate (as
    many rows as fit one: batches()), drawn from one generator; each continuation is printed when
    its batch is done, separated by a line."""
    if settings.show_probs:
        raise UserError("--show-probs takes one prompt")
    context, device = model.config.max_position_embeddings, model.lm_head.weight.device
    generator = make_generator(device, settings.seed)
    rows = (fitted for p in prompts
            for fitted in [prompt_ids(tokenizer, p, settings, context, args.chat, args.show_prompt)]
            for _ in range(args.num_samples))
    for b, batch in enumerate(batches(rows)):
        n, T = min(n for _, n in batch), max(len(ids) for ids, _ in batch)
        idx = torch.tensor([[0] * (T - len(ids)) + ids for ids, _ in batch], device=device)  # left padding
        mask = torch.tensor([[0] * (T - len(ids)) + [1] * len(ids) for ids, _ in batch], device=device)
        out = generate(model, idx, n, temperature=settings.temperature, top_k=settings.top_k,
                       top_p=settings.top_p, eos_token_id=stop, generator=generator, attention_mask=mask,
                       decoder=decoder)
        for i, ((ids, _), row) in enumerate(zip(batch, out[:, T:].tolist())):
            new = row[:next((j for j, t in enumerate(row) if t in stop), len(row))]  # up to the first stop
            if b or i:
                print("---------------")
            print(tokenizer.decode(new if args.chat else ids + new, skip_special_tokens=True))


# -----------------------------------------------------------------------------
# the command line


def main(argv=None):
    args = get_parser().parse_args(argv)
    settings = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    utf8_stdin()
    try:
        for name in RULES:
            check(name, getattr(args, name))
        prompts = read_prompts(args)
        ckpt, model, tokenizer, stop = load(args)
        # once per model: the engine packs its copy of the weights at first use and keeps it
        decoder = Engine(model) if args.engine else next_tokens
        if not prompts:
            interactive.run(ckpt, model, tokenizer, stop, decoder, settings, args.chat, args.show_prompt)
        elif len(prompts) == 1:
            one_prompt(args, model, tokenizer, stop, decoder, settings, prompts[0])
        else:
            one_batch(args, model, tokenizer, stop, decoder, settings, prompts)
    except (UserError, CheckpointError, FloatingPointError) as e:  # FloatingPointError: NaN or inf logits
        sys.exit(error(e))
    except KeyboardInterrupt:  # Ctrl-C while loading or reading stdin
        sys.exit(130)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: this file's docstring as it is written, then each flag with its default."""


def get_parser():
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", default=None, help="checkpoint folder (config.json, model.safetensors, tokenizer files: "
                   "any Hugging Face Qwen3 folder) or a training run's folder (uses its best/, else its last/); "
                   "without it, out (where train.py writes)")
    p.add_argument("--prompt", default=None, action="append", help='generate from this prompt, print and exit ("-" '
                   'reads it from stdin, "" samples unconditionally); repeat it for several prompts, decoded '
                   'together in batches; without it (or --prompt-file), open the interactive prompt')
    p.add_argument("--prompt-file", default=None, help="a text file of prompts, one per line (blank lines "
                   "skipped), decoded in batches, after any --prompt")
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
    p.add_argument("--no-engine", dest="engine", action="store_false", help="send every token through qwen3.py's "
                   "own generation loop (qwen3.next_tokens): slower, and the path to read; without it, engine.Engine "
                   "computes the same tokens faster")
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


if __name__ == "__main__":
    main()
