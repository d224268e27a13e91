"""
The interactive prompt that `python generate.py` opens without --prompt: type a prompt and its
continuation streams after it (with --chat, the model's reply; the conversation is kept). Lines
starting with / change the settings or look inside: /tokens shows how the last prompt was split,
/probs what the model weighed at each step. Each generation goes through sampling.stream, as in
generate.py's one-shot path.
"""
import sys

import torch

from common import UserError, error
from qwen3 import MoE
from sampling import check, make_generator, print_tokens, prompt_ids, read_text, stream, token_piece, utf8

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
  /experts        a mixture of experts: which experts each sparse layer sent the last prompt's tokens to
{chat}  /settings       show the current settings
  /help           show this help
  /quit           leave (so do Ctrl-D and Ctrl-C at the prompt; Ctrl-C during a generation stops it)
{empty}"""

HELP_CHAT = """\
  /think on|off   let the model think before it answers (Qwen3's enable_thinking)
  /reset          forget the conversation so far
"""

COMMANDS = {  # /command: (setting, type of its value)
    "/n": ("max_new_tokens", int),
    "/temp": ("temperature", float),
    "/topk": ("top_k", int),
    "/topp": ("top_p", float),
    "/seed": ("seed", int),
}


def help_text(chat):
    if chat:
        return HELP.format(chat=HELP_CHAT, empty='An empty line sends an empty message, as --prompt "" does.')
    return HELP.format(chat="", empty='An empty line samples unconditionally, from the start token alone, as '
                       '--prompt "" does.\nWith --chat there are /think and /reset too.')


def on_off(flag):
    return "on" if flag else "off"


def switch(name, values, now):
    if values not in (["on"], ["off"]):
        raise UserError(f"usage: {name} on|off (now {on_off(now)})")
    return values == ["on"]


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


def show_experts(model, tokenizer, ids):
    """/experts: for each token of the last prompt, the experts each sparse layer chose (their weights
    in %), from one more forward pass over it (each MoE keeps the router logits of its last pass);
    then how many of its experts each layer used."""
    sparse = [(i, layer.mlp) for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, MoE)]
    if not sparse:
        return "no experts: this model is dense (one MLP in every layer)"
    with torch.no_grad():
        model(torch.tensor([ids], device=model.lm_head.weight.device))
    choices = [moe.choose(moe.router_logits) for _, moe in sparse]  # per layer: weights and experts, (T, k) each
    lines = [f"{len(ids)} tokens (the last prompt), the experts each sparse layer sent them to (weight %):"]
    for t, token in enumerate(ids):
        cells = ["L{}: {}".format(i, " ".join(f"{e}({100 * w:.0f})" for w, e in zip(weights[t].tolist(), experts[t].tolist())))
                 for (i, _), (weights, experts) in zip(sparse, choices)]
        lines.append(f"{token_piece(tokenizer, token):<12} " + "  ".join(cells))
    used = [f"L{i}: {experts.unique().numel()} of {moe.experts.gate_proj.size(0)}" for (i, moe), (_, experts) in zip(sparse, choices)]
    return "\n".join(lines + ["experts used: " + ", ".join(used)])


class Session:
    """One sitting at the prompt: the model and what the user has set, the random numbers that
    every generation draws from in turn, and with --chat the conversation so far."""

    def __init__(self, model, tokenizer, stop, decoder, settings, chat, show_prompt):
        self.model, self.tokenizer, self.stop, self.decoder = model, tokenizer, stop, decoder
        self.settings, self.chat, self.show_prompt = settings, chat, show_prompt
        self.generator = make_generator(model.lm_head.weight.device, settings.seed)
        self.seeded_state = self.generator.get_state()  # once it differs, the seed no longer says what comes next
        self.history = []  # with --chat: the messages so far
        self.last_ids = None  # the last prompt as the model got it, for /tokens

    def settings_line(self):
        settings = self.settings
        return (f"settings: /temp {settings.temperature} /topk {settings.top_k} /topp {settings.top_p} "
                f"/n {settings.max_new_tokens} /seed {self.seed_words()} /probs {on_off(settings.show_probs)}"
                + (f" /think {on_off(settings.think)}" if self.chat else ""))

    def seed_words(self):
        seed = self.settings.seed
        if seed is None:
            return "random"
        if torch.equal(self.generator.get_state(), self.seeded_state):
            return str(seed)
        return f"{seed} (the sampler has drawn since it was set: /seed {seed} starts it again)"

    def command(self, line):
        """Apply one /command; True means quit. A bad one raises UserError."""
        name, *values = line.split()
        settings = self.settings
        if name in ("/quit", "/exit", "/q"):
            return True
        if name == "/help":
            print(help_text(self.chat))
        elif name == "/settings":
            print(self.settings_line())
        elif name in ("/tokens", "/experts"):
            show = show_tokens if name == "/tokens" else lambda tok, ids: show_experts(self.model, tok, ids)
            print(f"no prompt yet: {name} looks at the last one" if self.last_ids is None
                  else show(self.tokenizer, self.last_ids))
        elif name == "/probs":
            settings.show_probs = switch(name, values, settings.show_probs)
            print(self.settings_line())
        elif name == "/reset":
            self.history.clear()
            print("conversation cleared" if self.chat else "nothing to reset: each prompt stands alone without --chat")
        elif name == "/think":
            if not self.chat:
                raise UserError("/think applies only to --chat (it switches the chat template's thinking)")
            settings.think = switch(name, values, settings.think)
            print(self.settings_line())
        elif name in COMMANDS:
            key, kind = COMMANDS[name]
            if len(values) != 1:
                raise UserError(f"usage: {name} VALUE (now {getattr(settings, key)})")
            try:
                value = kind(values[0])
            except ValueError:
                needs = "an integer" if kind is int else "a number"
                raise UserError(f"{name} needs {needs}, got {values[0]!r}") from None
            check(key, value)
            setattr(settings, key, value)
            if key == "seed":
                self.generator.manual_seed(value)
                self.seeded_state = self.generator.get_state()
            print(self.settings_line())
        else:
            raise UserError(f"unknown command {name}; /help lists the commands")
        return False

    def reply(self, line):
        """Stream what follows a line: the prompt, echoed, then its continuation on the same line so
        that it reads on from what was typed; with --chat the model's reply, on its own. Then a line
        of numbers. An empty line is a prompt too: unconditional samples, or an empty message. The
        conversation keeps the message and its reply once both exist (a failure keeps neither)."""
        message = {"role": "user", "content": line}
        settings = self.settings
        ids, max_new_tokens = prompt_ids(self.tokenizer, [*self.history, message] if self.chat else line, settings,
                                         self.model.config.max_position_embeddings, self.chat, self.show_prompt)
        self.last_ids = ids
        tokens = stream(self.model, torch.tensor([ids], device=self.model.lm_head.weight.device), max_new_tokens,
                        temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                        eos_token_id=self.stop, generator=self.generator, with_probs=settings.show_probs,
                        decoder=self.decoder)
        new, first, seconds, interrupted = print_tokens(tokens, self.tokenizer, ids, echo=not self.chat,
                                                        probs=settings.show_probs)
        print("\n[stopped]" if interrupted else "")
        if self.chat:
            reply = self.tokenizer.decode(new, skip_special_tokens=True)
            self.history += [message, {"role": "assistant", "content": reply}]
        if new:  # decoding speed: the steps after the first token (whose time includes the prompt's pass)
            rate = f", {(len(new) - 1) / (seconds - first):.1f} tokens/s" if len(new) > 1 else ""
            print(f"[{len(new)} tokens{rate}, first token after {first:.2f}s]")
        else:
            print("[no tokens: the model ended at once]")


def read_line(prompt=""):
    """The next line typed at the prompt, without its line break (EOFError at the end): input() at a
    terminal, for its line editing and history; from a pipe or a file, sampling.read_text, which
    keeps a line's last characters only and refuses one without end (/dev/zero)."""
    if sys.stdin.isatty():
        return input(prompt)
    print(prompt, end="", flush=True)
    line = read_text(sys.stdin, "stdin")
    if line is None:
        raise EOFError
    return line.removesuffix("\n")


def run(ckpt, model, tokenizer, stop, decoder, settings, chat, show_prompt):
    """Read lines until /quit, Ctrl-D or Ctrl-C at the prompt: /commands, else prompts."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (importing it gives input() line editing and history)
        except ImportError:
            pass
    session = Session(model, tokenizer, stop, decoder, settings, chat, show_prompt)
    weight = model.lm_head.weight
    print(f"Qwen3 with {model.num_params():,} parameters from {ckpt} on {weight.device} ({weight.dtype})"
          f"{', chat mode' if chat else ''}. /help lists the commands.")
    print(session.settings_line())
    while True:
        try:
            line = read_line("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        try:  # a bad command or prompt (not UTF-8, say) or a broken model (NaN logits) is one line; the session goes on
            line = utf8(line, "the line")
            if not line.startswith("/"):
                session.reply(line)
            elif session.command(line):
                return
        except (UserError, FloatingPointError) as e:
            error(e)
