"""train.py and data.py, offline on the CPU, with a model of a few thousand parameters.

Most runs call train.main(argv) in-process (no interpreter start-up per run); the ones about
signals and exit codes run train.py as a real subprocess. One data cache is shared by the module,
so the corpus is tokenised once.
"""
import argparse
import errno
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import common
import data
import flags
import train
from qwen3 import Qwen3, Qwen3Config, from_pretrained

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--data", "embedded", "--max-docs", "300", "--vocab-size", "512", "--device", "cpu",
        "--hidden-size", "32", "--intermediate-size", "64", "--num-hidden-layers", "2",
        "--num-attention-heads", "4", "--num-key-value-heads", "2", "--head-dim", "8",
        "--batch-size", "4", "--seq-len", "32", "--eval-batches", "2", "--sample-tokens", "0"]
REF = ["--max-steps", "12", "--eval-every", "4", "--dropout", "0.1"]  # dropout: resume must restore the RNG


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def main(argv):
    """train.main in-process; returns its exit code (argparse's exits included)."""
    try:
        return train.main(argv)
    except SystemExit as e:
        return e.code


def run(cache, out, *args):
    return main([*TINY, "--cache-dir", str(cache), "--out-dir", str(out), *args])


def run_process(cache, out, *args, wait=True):
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, "--cache-dir", str(cache), "--out-dir", str(out), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def one_error_line(text):
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    assert "Traceback" not in text
    return lines[0]


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def ref(cache, tmp_path_factory):
    """A finished 12-step reference run."""
    out = tmp_path_factory.mktemp("ref") / "out"
    assert run(cache, out, *REF, "--sample-tokens", "8") == 0
    return out


# %% the run itself


def test_run_writes_metrics_and_learns(ref):
    m = metrics(ref)
    assert [r["step"] for r in m] == [0, 4, 8, 12]
    assert m[-1]["val_loss"] < m[0]["val_loss"] - 0.05
    assert m[0]["val_loss"] == pytest.approx(math.log(512), abs=0.3)  # a fresh model is near uniform
    for r in m:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-12)
        assert 0.0 <= r["val_acc"] <= 1.0
        assert r["epoch"] >= 0 and math.isfinite(r["train_loss"])
    info = json.loads((ref / "last" / "training_state.json").read_text())
    assert info["step"] == 12
    best = min(m[1:], key=lambda r: r["val_loss"])
    assert info["best_step"] == best["step"] and info["best_val_loss"] == best["val_loss"]


@pytest.mark.parametrize("name", ["best", "last"])
def test_checkpoints_load_in_transformers(ref, name, assert_logits_close):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = ref / name
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(path)
    ours = from_pretrained(path).eval()
    ids = torch.tensor([tok("In the beginning God created the heaven and the earth.")["input_ids"]])
    assert tok.decode(ids[0]) == "In the beginning God created the heaven and the earth."
    with torch.no_grad():
        assert_logits_close(ours(ids)[0], hf(ids).logits)
    assert hf.config.vocab_size == len(tok) and hf.config.eos_token_id == tok.eos_token_id


def test_val_metrics_match_an_independent_evaluation(ref, cache):
    """The logged final val loss and accuracy, recomputed with transformers from last/ on the first
    eval windows of the cached validation tokens."""
    from transformers import AutoModelForCausalLM
    info = json.loads((ref / "last" / "training_state.json").read_text())
    meta = json.loads((cache / f"tokens-{info['data_key']}" / "meta.json").read_text())
    val = np.fromfile(cache / f"tokens-{info['data_key']}" / "val.bin", dtype=meta["dtype"]).astype(np.int64)
    windows = torch.from_numpy(np.stack([val[s:s + 33] for s in data.fixed_starts(val, 32, 8)]))  # 2 batches x 4
    hf = AutoModelForCausalLM.from_pretrained(ref / "last", attn_implementation="eager").eval()
    with torch.no_grad():
        logits = hf(windows[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    acc = (logits.argmax(-1) == windows[:, 1:]).float().mean().item()
    assert metrics(ref)[-1]["val_loss"] == pytest.approx(loss, abs=1e-5)
    assert metrics(ref)[-1]["val_acc"] == pytest.approx(acc, abs=1e-6)


def test_lr_schedule():
    lrs = [train.lr_multiplier(s, 100, 0.05, 0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(0.2) and lrs[4] == 1.0  # 5 warmup steps
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # then only down
    assert lrs[100] == pytest.approx(0.1)
    short = [train.lr_multiplier(s, 20, 0.05, 0.1) for s in range(20)]
    assert short[0] == 1.0 and min(short) > 0.1  # a 20-step run warms up in one step and still learns


def test_wsd_schedule():
    wsd = [train.lr_multiplier(s, 100, 0.05, 0.1, decay_frac=0.4) for s in range(101)]
    assert wsd[0] == pytest.approx(0.2) and wsd[4] == 1.0  # the same warmup
    assert wsd[4:61] == [1.0] * 57  # the peak, held until the last 40 steps begin
    assert wsd[70] == pytest.approx(1 - 0.9 * 10 / 40) and wsd[80] == pytest.approx(0.55)  # a straight line
    assert wsd[100] == pytest.approx(0.1)


def test_zero_init_output(cache, tmp_path):
    """--zero-init-output zeroes the two projections into the residual stream and nothing else."""
    weights = []
    for i, extra in enumerate(([], ["--zero-init-output"])):
        try:
            args, device, info = train.parse_args([*TINY, "--cache-dir", str(cache), "--out-dir", str(tmp_path / str(i)),
                                                   *extra])
            weights.append(train.setup(args, device, info, log=lambda *a, **k: None).model.state_dict())
        finally:
            train.release_out_dirs()
    zeroed = {k for k in weights[0] if k.endswith(("o_proj.weight", "down_proj.weight"))}
    assert len(zeroed) == 4  # two layers, two each
    for k, v in weights[1].items():
        if k in zeroed:
            assert not v.any() and weights[0][k].any()
        else:
            assert torch.equal(v, weights[0][k]), k


def test_muon_momentum_warmup(cache, tmp_path):
    assert [train.muon_momentum(s, 100, 0.3) for s in (0, 15, 30, 99)] == pytest.approx([0.85, 0.90, 0.95, 0.95])
    assert train.muon_momentum(0, 100, 0.0) == 0.95
    # After one step Muon's buffer is (1 - momentum) x the first gradient, which is the same in
    # both runs: warmed up (0.85) it holds three times what it holds at 0.95.
    bufs = []
    for frac in ("0.3", "0"):
        out = tmp_path / frac
        assert run(cache, out, "--max-steps", "10", "--stop-at", "1", "--momentum-warmup-frac", frac) == 0
        state = torch.load(out / "last" / "training_state.pt", weights_only=True)["optimizers"][0]["state"]
        bufs.append(torch.cat([s["momentum_buffer"].flatten() for s in state.values()]))
    torch.testing.assert_close(bufs[0], 3 * bufs[1], rtol=1e-5, atol=1e-9)


def test_grad_accumulation_averages(cache, tmp_path):
    """8 sequences in one micro-batch == 2 micro-batches of 4. AdamW with a huge epsilon makes the
    update proportional to the gradient, so a sum instead of a mean would show."""
    common = ["--optimizer", "adamw", "--adam-eps", "1", "--lr", "1", "--grad-clip", "0", "--max-steps", "3",
              "--eval-every", "3"]
    assert run(cache, tmp_path / "a", *common, "--batch-size", "8") == 0
    assert run(cache, tmp_path / "b", *common, "--batch-size", "4", "--grad-accum", "2") == 0
    a, b = from_pretrained(tmp_path / "a" / "last"), from_pretrained(tmp_path / "b" / "last")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4, msg=name)


def test_cuda_graphs_where_a_replay_is_the_whole_backward():
    """On CUDA the loss replays CUDA graphs unless --no-cuda-graphs; not for more than one process
    or micro-batch (a replay overwrites the last backward's gradients: they would not add up), a
    mixture of experts (it reads its groups' sizes back), --compile, or another device."""
    parser = flags.build_parser()
    args = parser.parse_args([])
    assert args.cuda_graphs and not parser.parse_args(["--no-cuda-graphs"]).cuda_graphs
    shape = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8)
    dense, experts = Qwen3(Qwen3Config(**shape)), Qwen3(Qwen3Config(**shape, num_experts=4, num_experts_per_tok=2,
                                                                    moe_intermediate_size=8))
    cuda = torch.device("cuda")
    assert train.use_cuda_graphs(args, cuda, dense, world=1)
    for change, device, model, world in [(dict(cuda_graphs=False), cuda, dense, 1), (dict(grad_accum=2), cuda, dense, 1),
                                         (dict(compile=True), cuda, dense, 1), ({}, cuda, dense, 2),
                                         ({}, cuda, experts, 1), ({}, torch.device("cpu"), dense, 1)]:
        assert not train.use_cuda_graphs(argparse.Namespace(**{**vars(args), **change}), device, model, world), change


def test_training_on_a_graphs_reused_gradient_buffers(cache, tmp_path, monkeypatch):
    """Under CUDA graphs every backward writes the same buffers, and autograd hands each one on as
    .grad itself. Imitated on the CPU (a backward that recomputes the loss and writes its gradients
    into buffers it keeps), train.py's steps (clipping in place, Muon and AdamW) train the same
    weights to the last bit as with fresh gradients: nothing holds a gradient from one step to the
    next. With two micro-batches a step they do not (the second backward rewrites the buffer .grad
    is, then adds it to itself): why use_cuda_graphs asks for --grad-accum 1."""
    def imitate_graphs(loss, batch_size, seq_len, autocast_dtype):
        params, forward = list(loss.parameters()), loss.forward
        buffers = [torch.zeros_like(p) for p in params]

        class Replayed(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, y, *weights):
                ctx.save_for_backward(x, y)
                return forward(x, y)

            @staticmethod
            def backward(ctx, grad):
                with torch.enable_grad():
                    grads = torch.autograd.grad(forward(*ctx.saved_tensors), params, grad)
                for buffer, g in zip(buffers, grads):
                    buffer.copy_(g)  # what replaying a backward graph does: rewrite its own buffers
                return (None, None, *(b.detach() for b in buffers))
        loss.forward = lambda x, y: Replayed.apply(x, y, *params)
        return loss

    def weights(out, accum, graphs):
        with monkeypatch.context() as m:
            if graphs:
                m.setattr(train, "use_cuda_graphs", lambda *a: True)
                m.setattr(train, "cuda_graphed", imitate_graphs)
            assert run(cache, out, "--max-steps", "6", "--eval-every", "6", "--grad-clip", "0.5",
                       "--grad-accum", accum) == 0
        return from_pretrained(out / "last").state_dict().values()

    for accum, same in (("1", True), ("2", False)):
        fresh, reused = (weights(tmp_path / f"{accum}-{graphs}", accum, graphs) for graphs in (False, True))
        assert all(torch.equal(a, b) for a, b in zip(fresh, reused)) == same, accum


# %% resuming


def test_resume_is_exact(ref, cache, tmp_path):
    """12 steps in one go == 6 steps, stop, resume to 12: same losses, same weights."""
    out = tmp_path / "out"
    assert run(cache, out, *REF, "--stop-at", "6") == 0
    assert json.loads((out / "last" / "training_state.json").read_text())["step"] == 6
    assert main(["--resume", "--out-dir", str(out)]) == 0  # flags come from the checkpoint
    want, got = metrics(ref), metrics(out)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for w, g in zip(want, got):
        assert g["train_loss"] == pytest.approx(w["train_loss"], abs=1e-6)
        assert g["val_loss"] == pytest.approx(w["val_loss"], abs=1e-6)
    a, b = from_pretrained(ref / "last"), from_pretrained(out / "last")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0, msg=name)


def test_compiled_training_resumes_exactly(cache, tmp_path):
    """--compile (torch.compile of engine.FusedLoss) trains, and 4 steps in one go equal 2 steps, a
    stop and a compiled --resume (--compile is this session's choice, not the run's: given again)."""
    flags = ["--max-steps", "4", "--eval-every", "2", "--compile", "--eval-sample-tokens", "0"]
    assert run(cache, tmp_path / "whole", *flags) == 0
    out = tmp_path / "out"
    assert run(cache, out, *flags, "--stop-at", "2") == 0
    assert main(["--resume", "--out-dir", str(out), "--compile"]) == 0
    assert [r["val_loss"] for r in metrics(out)] == pytest.approx([r["val_loss"] for r in metrics(tmp_path / "whole")],
                                                                  abs=1e-6)
    a, b = from_pretrained(tmp_path / "whole" / "last"), from_pretrained(out / "last")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0, msg=name)


def test_resume_of_a_run_saved_before_later_flags(cache, tmp_path):
    """A checkpoint written before --momentum-warmup-frac existed, of a cpu-preset model when the
    preset's head was still tied: --resume continues it as it started (no warmup, tied head)."""
    old = ["--momentum-warmup-frac", "0", "--tie-word-embeddings"]
    assert run(cache, tmp_path / "whole", *REF, *old) == 0
    out = tmp_path / "out"
    assert run(cache, out, *REF, *old, "--stop-at", "2") == 0  # inside today's default warmup (3.6 steps)
    state = out / "last" / "training_state.json"
    info = json.loads(state.read_text())
    del info["args"]["momentum_warmup_frac"]
    info["args"]["tie_word_embeddings"] = None  # what a run of the old preset saved
    state.write_text(json.dumps(info))
    assert main(["--resume", "--out-dir", str(out)]) == 0
    want, got = metrics(tmp_path / "whole"), metrics(out)
    assert [r["val_loss"] for r in got] == pytest.approx([r["val_loss"] for r in want], abs=1e-6)
    assert json.loads((out / "last" / "config.json").read_text())["tie_word_embeddings"] is True


def test_resume_past_max_steps_does_nothing(ref, tmp_path, capsys):
    out = copy_run(ref, tmp_path / "out")
    before = (out / "last" / "model.safetensors").read_bytes()
    assert main(["--resume", "--out-dir", str(out)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "last" / "model.safetensors").read_bytes() == before


def test_resume_with_more_steps_continues(ref, tmp_path):
    out = copy_run(ref, tmp_path / "out")
    assert main(["--resume", "--out-dir", str(out), "--max-steps", "16"]) == 0
    assert [r["step"] for r in metrics(out)] == [0, 4, 8, 12, 16]
    assert json.loads((out / "last" / "training_state.json").read_text())["step"] == 16


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_last_and_resume_finishes(cache, tmp_path, sig):
    """SIGTERM (kill, schedulers) and Ctrl-C's SIGINT: save last/, exit 128 + signal, resumable."""
    out = tmp_path / "out"
    proc = run_process(cache, out, "--max-steps", "400", "--eval-every", "100", wait=False)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)  # the step-0 evaluation is logged once the signal handlers are in place
    time.sleep(0.5)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, stderr
    assert "stopped at step" in stdout and "Traceback" not in stderr
    assert f"Continue with: python train.py --resume --out-dir {out}\n" in stdout  # the folder in use, not out/
    step = json.loads((out / "last" / "training_state.json").read_text())["step"]
    assert 0 <= step < 400
    assert main(["--resume", "--out-dir", str(out), "--max-steps", str(step + 4)]) == 0
    assert json.loads((out / "last" / "training_state.json").read_text())["step"] == step + 4


def test_kill_9_leaves_a_checkpoint_to_resume(cache, tmp_path):
    """kill -9 at random moments while last/ is being rewritten every step: a complete checkpoint
    always survives and --resume continues from it."""
    rng = random.Random(0)
    for trial in range(2):
        out = tmp_path / f"out{trial}"
        proc = run_process(cache, out, "--max-steps", "400", "--eval-every", "100", "--save-every", "1", wait=False)
        deadline = time.time() + 300
        while not (out / "last").exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 1.0))
        proc.kill()
        proc.communicate()
        checkpoint.recover(out)  # what every start does first
        step = json.loads((out / "last" / "training_state.json").read_text())["step"]
        assert main(["--resume", "--out-dir", str(out), "--max-steps", str(step + 3), "--save-every", "0"]) == 0
        assert json.loads((out / "last" / "training_state.json").read_text())["step"] == step + 3
        assert sorted(p.name for p in out.iterdir()) == [".lock", "best", "curves.png", "last", "metrics.jsonl"]


def test_recover_interrupted_saves(tmp_path):
    def ckpt(path, tag):
        path.mkdir()
        (path / "tag").write_text(tag)

    cases = {  # what a crash can leave behind (see save_checkpoint) -> what must be last/
        "mid-write": ({"last": "old", ".last.tmp": "partial"}, "old"),
        "between renames": ({".last.old": "old", ".last.tmp": "new"}, "new"),
        "old kept, new in place": ({"last": "new", ".last.old": "old"}, "new"),
        "first save, mid-write": ({".last.tmp": "partial"}, None),
    }
    for name, (left, want) in cases.items():
        out = tmp_path / name.replace(" ", "_").replace(",", "")
        out.mkdir()
        for d, tag in left.items():
            ckpt(out / d, tag)
        checkpoint.recover(out)
        assert [p.name for p in out.iterdir()] == (["last"] if want else []), name
        if want:
            assert (out / "last" / "tag").read_text() == want, name


def test_failed_save_keeps_previous_checkpoint(ref, tmp_path, monkeypatch, capsys):
    out = copy_run(ref, tmp_path / "out")
    before = {f.name: f.read_bytes() for f in (out / "last").iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    assert main(["--resume", "--out-dir", str(out), "--max-steps", "16"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and "previous checkpoint is intact" in line
    assert {f.name: f.read_bytes() for f in (out / "last").iterdir()} == before
    assert sorted(p.name for p in out.iterdir()) == [".lock", "best", "curves.png", "last",
                                                     "metrics.jsonl"]  # no temporary left


class Exploit:
    marker = None

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("update_checksum", [False, True])
def test_tampered_training_state_is_refused(ref, tmp_path, capsys, update_checksum):
    out = copy_run(ref, tmp_path / "out")
    Exploit.marker = tmp_path / "pwned"
    state = out / "last" / "training_state.pt"
    state.write_bytes(pickle.dumps(Exploit(), protocol=2))
    if update_checksum:  # a careful attacker fixes the JSON too: weights_only=True still refuses
        info_path = out / "last" / "training_state.json"
        info = json.loads(info_path.read_text())
        info["training_state_sha256"] = common.sha256(state)
        info_path.write_text(json.dumps(info))
    assert main(["--resume", "--out-dir", str(out), "--max-steps", "16"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "training_state.pt" in line
    assert ("does not match the checksum" in line) != update_checksum  # which of the two guards refused it
    assert not Exploit.marker.exists()


# %% data


@pytest.fixture(scope="module")
def docs():
    return data.embedded_documents("wiki+kjv")[:400]


def test_split_is_by_document_and_disjoint(docs):
    train_docs, val_docs = data.split_documents(docs + docs[:50], 0.1, seed=0)  # with duplicates
    assert not set(train_docs) & set(val_docs)
    assert set(train_docs) | set(val_docs) == set(docs) and len(train_docs) + len(val_docs) == len(docs)
    assert len(val_docs) == 40
    assert data.split_documents(docs, 0.1, seed=0) == data.split_documents(docs, 0.1, seed=0)
    assert data.split_documents(docs, 0.1, seed=1)[1] != val_docs


def test_token_files_follow_the_split(cache, tmp_path):
    logs = []
    d = data.prepare_data("embedded", "auto", vocab_size=512, max_docs=120, max_tokens=None, val_frac=0.1,
                          split_seed=0, text_field="text", cache_dir=tmp_path, log=logs.append)
    train_docs, val_docs = data.split_documents(data.embedded_documents("wiki+kjv")[:120], 0.1, seed=0)
    eos = d.tokenizer.eos_token_id
    for tokens, want in ((d.val, val_docs), (d.train, train_docs)):
        pieces = np.split(np.asarray(tokens), np.flatnonzero(np.asarray(tokens) == eos) + 1)[:-1]
        assert [d.tokenizer.decode(p[:-1]) for p in pieces] == want  # documents intact, EOS after each
    assert d.train.dtype == np.uint16 and d.meta["val_docs"] == 12


def test_data_cache_is_reused(tmp_path):
    kwargs = dict(vocab_size=512, max_docs=60, max_tokens=None, val_frac=0.1, split_seed=0, text_field="text",
                  cache_dir=tmp_path)
    first, second = [], []
    data.prepare_data("embedded", "auto", **kwargs, log=first.append)
    (train_bin,) = tmp_path.glob("tokens-*/train.bin")
    mtime = train_bin.stat().st_mtime_ns
    d = data.prepare_data("embedded", "auto", **kwargs, log=second.append)
    assert any("tokenising" in line for line in first)
    assert second == [f"data: using cached tokens in {train_bin.parent}"]
    assert train_bin.stat().st_mtime_ns == mtime and len(d.train) > 0
    data.prepare_data("embedded", "auto", **{**kwargs, "max_docs": 61}, log=second.append)
    assert "tokenising" in second[-1] and len(list(tmp_path.glob("tokens-*"))) == 2  # the key follows the limits


def write_corpus(path: Path, texts: list[str]):
    if path.suffix == ".txt":
        path.write_text("\n\n".join(texts) + "\n")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"text": texts}), path)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet"])
def test_local_files_go_through_datasets(tmp_path, docs, suffix):
    texts = [" ".join(d.split()) for d in docs[:80]]  # one paragraph each, for the .txt case
    path = tmp_path / f"corpus{suffix}"
    write_corpus(path, texts)
    d = data.prepare_data(str(path), "auto", vocab_size=512, max_docs=None, max_tokens=None, val_frac=0.1,
                          split_seed=0, text_field="text", cache_dir=tmp_path / "cache", log=lambda s: None)
    assert (d.meta["train_docs"], d.meta["val_docs"]) == (72, 8)
    eos = d.tokenizer.eos_token_id
    first_val = np.asarray(d.val)[:np.flatnonzero(np.asarray(d.val) == eos)[0]]
    assert d.tokenizer.decode(first_val) in texts


def test_training_on_a_local_file(tmp_path, docs):
    path = tmp_path / "mine.jsonl"
    write_corpus(path, docs[:120])
    out = tmp_path / "out"
    assert main([*TINY, "--data", str(path), "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(out),
                       "--max-steps", "4", "--eval-every", "2"]) == 0
    assert [r["step"] for r in metrics(out)] == [0, 2, 4]
    assert json.loads((out / "last" / "training_state.json").read_text())["args"]["data"] == str(path)


def test_auto_falls_back_to_embedded_offline(tmp_path, monkeypatch):
    logs = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = data.prepare_data("auto", "auto", vocab_size=512, max_docs=60, max_tokens=None, val_frac=0.1,
                          split_seed=0, text_field="text", cache_dir=tmp_path, log=logs.append)
    assert d.spec == "embedded"
    assert "unavailable (HF_HUB_OFFLINE is set); using the embedded corpus" in logs[0]


def test_unreachable_hub_is_detected(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the local discard port: refused at once
    assert data.offline_mode() is None
    assert "did not answer" in data.hub_unreachable(timeout=2.0)


def test_batches_are_a_pure_function_of_seed_and_sample():
    tokens = np.arange(10_000, dtype=np.uint16)
    a = data.Batches(tokens, 32, seed=3)
    n = a.windows_per_epoch
    starts = a.starts(np.arange(3 * n))
    assert np.array_equal(starts, data.Batches(tokens, 32, seed=3).starts(np.arange(3 * n)[::-1])[::-1])
    for e in range(3):
        epoch = np.sort(starts[e * n:(e + 1) * n])
        assert len(set((epoch - epoch[0]) // 32)) == n and np.all(np.diff(epoch) == 32)  # every window once
        assert epoch[-1] + 33 <= len(tokens)
    assert not np.array_equal(starts[:n], starts[n:2 * n])  # a fresh order each epoch
    assert not np.array_equal(starts[:n], data.Batches(tokens, 32, seed=4).starts(np.arange(n)))


# %% bad input: one line on stderr, non-zero exit, nothing lost


@pytest.mark.parametrize("args, message", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--optimizer", "sgd"], "unknown --optimizer 'sgd'"),
    (["--data", "missing/corpus.jsonl"], "data path not found"),
    (["--data", "nobody/no-such-dataset"], "cannot read hub dataset nobody/no-such-dataset"),
    (["--data", "smollm"], "cannot load tokenizer 'HuggingFaceTB/SmolLM-135M'"),
    (["--seq-len", "4096", "--max-docs", "4"], "corpus too small for --seq-len 4096"),
    (["--tokenizer", "/no/such/tokenizer"], "cannot load tokenizer '/no/such/tokenizer'"),
    (["--resume"], "no checkpoint to resume from"),
    (["--device", "tpu"], "unknown --device 'tpu'"),
    (["--max-steps", "0"], "--max-steps"),
])
def test_bad_input(cache, tmp_path, capsys, args, message):
    assert run(cache, tmp_path / "out", *args) != 0
    assert message in one_error_line(capsys.readouterr().err)


def test_out_dir_with_another_model_is_left_alone(ref, cache, tmp_path, capsys):
    out = copy_run(ref, tmp_path / "out")
    before = (out / "best" / "model.safetensors").read_bytes()
    assert run(cache, out, *REF, "--hidden-size", "64") == 1
    assert "holds a different model (hidden_size 32 there, 64 here)" in one_error_line(capsys.readouterr().err)
    assert run(cache, out, *REF) == 1  # the same model, but neither --resume nor --overwrite
    assert "pass --resume to continue it" in one_error_line(capsys.readouterr().err)
    assert (out / "best" / "model.safetensors").read_bytes() == before


def test_nan_loss_stops_and_keeps_the_checkpoint(ref, tmp_path, capsys):
    out = copy_run(ref, tmp_path / "out")
    before = (out / "last" / "model.safetensors").read_bytes()
    assert main(["--resume", "--out-dir", str(out), "--max-steps", "40", "--lr", "1e30", "--muon-lr", "1e30"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert re.search(r"loss is (nan|inf) at step (1[3-9]|[2-4]\d); stopped\. Last good checkpoint: .*last \(step 12\)",
                     line)
    assert (out / "last" / "model.safetensors").read_bytes() == before


@pytest.fixture
def loop_events(monkeypatch):
    """What the loop does, in order: ("forward", n, loss) for each training forward, ("read", step,
    loss) for each loss the loop reads. Inside train_step a read-back of any tensor fails the run.
    Set loop_events.inf_at = n to add inf to forward n's loss (its gradients stay finite)."""
    events, item, step = [], torch.Tensor.item, train.train_step
    forward, read = train.FusedLoss.forward, train.StepLoss.read

    def forward_(self, *args, **kwargs):
        loss = forward(self, *args, **kwargs)
        n = sum(e[0] == "forward" for e in events) + 1
        loss = loss + math.inf if n == getattr(record, "inf_at", None) else loss
        events.append(("forward", n, item(loss)))
        return loss

    def read_(self):
        events.append(("read", self.step, item(self.host)))
        return read(self)

    def refuse(*args):
        raise AssertionError("a value read back inside train_step")

    def train_step(run, state):
        with pytest.MonkeyPatch.context() as m:
            for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
                m.setattr(torch.Tensor, name, refuse)
            return step(run, state)

    monkeypatch.setattr(train.FusedLoss, "forward", forward_)
    monkeypatch.setattr(train.StepLoss, "read", read_)
    monkeypatch.setattr(train, "train_step", train_step)
    record = argparse.Namespace(events=events)
    return record


def test_a_step_is_queued_and_its_loss_read_once_the_next_is(cache, tmp_path, loop_events):
    """train_step reads nothing back; the loop reads each step's loss once the next step is queued
    (the CPU launches one step while a GPU computes the other), and reads at once a step that an
    evaluation or a save follows. Each read is its own step's loss, exactly."""
    assert run(cache, tmp_path / "out", "--max-steps", "6", "--eval-every", "3", "--save-every", "5") == 0
    order = [(kind, n) for kind, n, _ in loop_events.events]
    assert order == [("forward", 1), ("forward", 2), ("read", 1), ("forward", 3), ("read", 2), ("read", 3),
                     ("forward", 4), ("forward", 5), ("read", 4), ("read", 5), ("forward", 6), ("read", 6)]
    losses = {(kind, n): loss for kind, n, loss in loop_events.events}
    assert all(losses["read", n] == losses["forward", n] for n in range(1, 7))


@pytest.mark.parametrize("inf_at, flags, last_good, evaluated", [
    (5, [], "last (step 3)", [0, 3]),  # read once step 6 is queued: stops before step 6's evaluation
    (5, ["--stop-at", "5"], "last (step 3)", [0, 3]),  # read before --stop-at's save
    (3, [], "none, nothing was saved yet", [0]),  # an evaluation step: read before it is evaluated
])
def test_a_non_finite_loss_read_late_never_reaches_a_save(cache, tmp_path, loop_events, capsys, inf_at, flags,
                                                        last_good, evaluated):
    loop_events.inf_at = inf_at
    out = tmp_path / "out"
    assert run(cache, out, "--max-steps", "9", "--eval-every", "3", *flags) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: loss is inf at step {inf_at}; stopped. Last good checkpoint: ")
    assert line.endswith(last_good if last_good.startswith("none") else f"{out / last_good}")
    assert [r["step"] for r in metrics(out)] == evaluated
    if evaluated[-1]:
        assert json.loads((out / "last" / "training_state.json").read_text())["step"] == evaluated[-1]


def break_after(monkeypatch, at: int, breaking):
    """train.py's steps as they are, but once step `at` is done, breaking(model): an update gone wrong."""
    step = train.train_step

    def broken(run_, state):
        loss = step(run_, state)
        if state.step == at:
            with torch.no_grad():
                breaking(run_.model)
        return loss
    monkeypatch.setattr(train, "train_step", broken)


@pytest.mark.parametrize("broken_at, flags, last_good, evaluated", [
    (3, [], "none, nothing was saved yet", [0]),  # an evaluation follows: nothing of it scored or sampled
    (4, ["--save-every", "4"], "last (step 3)", [0, 3]),  # a save follows
    (5, ["--stop-at", "5"], "last (step 3)", [0, 3]),  # --stop-at's save follows
])
def test_an_update_that_breaks_the_weights_is_never_saved(cache, tmp_path, monkeypatch, capsys, broken_at, flags,
                                                         last_good, evaluated):
    """An update that overflows leaves its step's loss finite (computed before it). The weights are
    checked before an evaluation or a save: last/ and the metrics keep the last good step, nothing of
    the broken one is scored, sampled or saved, and the run stops with one line."""
    break_after(monkeypatch, broken_at, lambda model: next(model.parameters())[0, 0].fill_(math.nan))
    out = tmp_path / "out"
    assert run(cache, out, "--max-steps", "9", "--eval-every", "3", *flags) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: the weights are NaN or infinite after step {broken_at}; stopped. Last good "
                           f"checkpoint: ")
    assert line.endswith(last_good if last_good.startswith("none") else f"{out / last_good}")
    assert [r["step"] for r in metrics(out)] == evaluated
    if evaluated[-1]:
        assert json.loads((out / "last" / "training_state.json").read_text())["step"] == evaluated[-1]
        assert all(torch.isfinite(t).all() for t in load_file(out / "last" / "model.safetensors").values())
    else:
        assert not (out / "last").exists()


def test_a_diverged_model_is_not_scored_or_saved(cache, tmp_path, monkeypatch, capsys):
    """Weights finite but so large (a rate far too high) that the logits overflow: the evaluation's
    loss is not finite, and the run stops there with one line, before the metrics, a sample or
    last/ take anything of that step."""
    break_after(monkeypatch, 6, lambda model: model.lm_head.weight.fill_(3e38))  # finite; a logit sums 32 of them
    out = tmp_path / "out"
    assert run(cache, out, "--max-steps", "9", "--eval-every", "3", "--save-every", "5", "--sample-tokens", "4") == 1
    line = one_error_line(capsys.readouterr().err)  # step 6 is evaluated, not saved: last/ keeps step 5
    assert re.fullmatch(rf"error: the train loss is (nan|inf) at step 6's evaluation; stopped\. Last good checkpoint: "
                        rf"{re.escape(str(out / 'last'))} \(step 5\)", line), line
    assert [r["step"] for r in metrics(out)] == [0, 3]
    assert json.loads((out / "last" / "training_state.json").read_text())["step"] == 5


def test_bad_input_in_a_real_process(cache, tmp_path):
    for args in (["--preset", "huge"], ["--data", "missing.txt"], ["--batch-size", "x"]):
        result = run_process(cache, tmp_path / "out", *args)
        assert result.returncode != 0
        one_error_line(result.stderr)
