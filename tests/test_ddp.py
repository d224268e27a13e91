"""Data-parallel training: train.py under torchrun, 2 CPU processes (gloo), against 1 process.

One torchrun launch (the `ddp` fixture) runs this file as a script. Each of its two ranks runs
every job in JOBS in turn through train.main, noting what it did (the input rows and loss of each
training micro-batch, the gradient norm of each step, no_sync uses, Newton-Schulz batch sizes,
its final weights), and writes that to rank{R}.json. The tests compare it with the same runs in a
single process, which are in-process calls noted the same way.
"""
import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP

import engine
import train
from plots import read_metrics
from engine import FusedLoss
from qwen3 import from_pretrained
from test_train import TINY

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6
# --grad-clip 0.05 is below every gradient norm of these runs, so every step is clipped: a norm
# that is not the global one would show.
COMMON = [*TINY, "--max-steps", str(STEPS), "--eval-every", "3", "--grad-clip", "0.05"]
SPLIT_ACCUM = ["--batch-size", "2", "--grad-accum", "4"]  # 2 ranks x 2 micro-batches (no_sync on the first)
SPLIT_BATCH = ["--batch-size", "8", "--grad-accum", "1"]  # 2 ranks x 4 sequences
RUNS = {  # name -> flags; the same run in one process is the reference
    "adamw-accum": [*COMMON, *SPLIT_ACCUM, "--optimizer", "adamw"],
    "adamw-batch": [*COMMON, *SPLIT_BATCH, "--optimizer", "adamw"],
    "muon-accum": [*COMMON, *SPLIT_ACCUM, "--optimizer", "muon"],
    "muon-batch": [*COMMON, *SPLIT_BATCH, "--optimizer", "muon"],
}
# What the two ranks run, in order: name -> (calls, fault). Each call gets --cache-dir and --out-dir
# appended. fault: (rank, training forward number, "inf" | "SIGTERM") injected on that rank only.
JOBS = {
    "adamw-accum": ([RUNS["adamw-accum"]], None),
    "muon-batch": ([RUNS["muon-batch"]], None),
    "adamw-batch": ([[*RUNS["adamw-batch"], "--stop-at", "3"], ["--resume"]], None),  # resumed under torchrun
    "muon-accum": ([[*RUNS["muon-accum"], "--stop-at", "3"]], None),  # resumed in one process by a test
    "inf-on-rank-1": ([RUNS["muon-accum"]], (1, 4, "inf")),  # forward 4 on rank 1: the first of step 3
    "sigterm-on-rank-1": ([RUNS["muon-accum"]], (1, 4, "SIGTERM")),
    "batch-does-not-split": ([[*COMMON, "--batch-size", "3"]], None),
    "accum-does-not-split": ([[*COMMON, "--grad-accum", "3"]], None),
}
# Measured on CPU: 1 vs 2 processes differ by <= 2e-7 relative in per-step losses, gradient norms
# and evaluations, and by <= 1e-6 in final weights (only the order of the gradient sums differs);
# with both ranks reading the same share (a wrong global batch) the per-step losses differ by ~1e-2.
RTOL, WEIGHTS_RTOL = 1e-5, 1e-4


# %% what a run did


@contextlib.contextmanager
def noting(fault=None):
    """Wrap FusedLoss.forward (the training loss), clip_grad_norm_, DDP.no_sync, Newton-Schulz, configure_optimizers and
    prepare_data to note what training does; inject `fault` (see JOBS) into this process's
    training forwards."""
    notes = dict(inputs=[], losses=[], norms=[], no_sync=0, newton_schulz=[], cache_before=[])
    originals = (FusedLoss.forward, torch.nn.utils.clip_grad_norm_, DDP.no_sync, engine.newton_schulz,
                 train.configure_optimizers, train.prepare_data)
    forward, clip, no_sync, newton_schulz, configure, prepare_data = originals

    def forward_(self, idx, *args, **kwargs):  # the training loss
        loss = forward(self, idx, *args, **kwargs)
        notes["inputs"].append(idx.tolist())
        notes["losses"].append(loss.item())
        if fault and (int(os.environ["RANK"]), len(notes["losses"]) - 1) == fault[:2]:
            if fault[2] == "inf":
                loss = loss + math.inf  # this rank's loss only; the gradients stay finite
            else:
                os.kill(os.getpid(), signal.SIGTERM)
        return loss

    def clip_(params, max_norm):
        norm = clip(params, max_norm)
        notes["norms"].append(norm.item())
        return norm

    def no_sync_(self):
        notes["no_sync"] += 1
        return no_sync(self)

    def newton_schulz_(G, *args, **kwargs):
        notes["newton_schulz"].append(G.shape[0])  # the number of matrices in the stack
        return newton_schulz(G, *args, **kwargs)

    def configure_(model, *args, **kwargs):
        notes["model"] = model
        return configure(model, *args, **kwargs)

    def prepare_data_(*args, cache_dir, **kwargs):
        notes["cache_before"].append(sorted(p.name for p in Path(cache_dir).glob("*")))
        return prepare_data(*args, cache_dir=cache_dir, **kwargs)

    (FusedLoss.forward, torch.nn.utils.clip_grad_norm_, DDP.no_sync, engine.newton_schulz,
     train.configure_optimizers, train.prepare_data) = (forward_, clip_, no_sync_, newton_schulz_, configure_,
                                                        prepare_data_)
    try:
        yield notes
    finally:
        (FusedLoss.forward, torch.nn.utils.clip_grad_norm_, DDP.no_sync, engine.newton_schulz,
         train.configure_optimizers, train.prepare_data) = originals


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def next_group():
    """Each process group of this launch meets in a TCP store of its own, on the next port the
    test chose: a process group re-created in torchrun's own store finds the keys of the previous
    one (same name) and can wait forever."""
    ports = os.environ["TEST_DDP_PORTS"].split(",")
    os.environ.update(MASTER_PORT=ports.pop(0), TEST_DDP_PORTS=",".join(ports), TORCHELASTIC_USE_AGENT_STORE="0")


def run_job(calls, fault, cache: Path, out: Path) -> dict:
    """One job on this rank: its calls of train.main in turn, noted."""
    job = dict(rc=[], stdout="", stderr="")
    with noting(fault) as notes:
        for argv in calls:
            next_group()
            stdout, stderr = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                job["rc"].append(train.main([*argv, "--cache-dir", str(cache), "--out-dir", str(out)]))
            job["stdout"] += stdout.getvalue()
            job["stderr"] += stderr.getvalue()
    if "model" in notes:
        save_file(weights(notes.pop("model")), out.parent / f"weights{os.environ['RANK']}.safetensors")
    return {**job, **notes}


def muon_steps():
    """Two Muon steps on fixed random matrices (stacks of 5, 3 and 1 same-shape matrices) with fixed
    gradients; returns the matrices."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(16, 32)] * 5 + [(32, 16)] * 3 + [(8, 8)]]
    opt = engine.FastMuon(params, lr=0.02, weight_decay=0.1)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return {str(i): p.detach() for i, p in enumerate(params)}


def rank_main(root: Path) -> int:
    """One rank of the torchrun launch: every job, then Muon alone; notes to root/rank{R}.json."""
    torch.set_num_threads(1)
    rank, results = int(os.environ["RANK"]), {}
    for name, (calls, fault) in JOBS.items():
        (root / name).mkdir(exist_ok=True)
        results[name] = run_job(calls, fault, root / "cache", root / name / "out")
    next_group()
    dist.init_process_group("gloo")
    with noting() as notes:
        save_file(muon_steps(), root / f"muon{rank}.safetensors")
    dist.destroy_process_group()
    results["muon"] = notes
    (root / f"rank{rank}.json").write_text(json.dumps(results))
    return 0


# %% the launch, and the same runs in one process


def torchrun(*args, env=None) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node=2 ARGS...`, started."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """Wait for torchrun; past the timeout, SIGTERM it so that it stops its workers too."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun passes it on, and kills workers still there 30 s later
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{stdout[-5000:]}\n{stderr[-5000:]}")


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """Both ranks' notes, and the folder of the jobs' outputs. The cache starts empty."""
    root = tmp_path_factory.mktemp("ddp")
    with contextlib.ExitStack() as stack:  # free ports, one per process group (next_group)
        sockets = [stack.enter_context(socket.socket()) for _ in range(sum(len(c) for c, _ in JOBS.values()) + 1)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        ports = ",".join(str(s.getsockname()[1]) for s in sockets)
    proc = torchrun(__file__, root, env={"TEST_DDP_PORTS": ports})
    stdout, stderr = finish(proc, timeout=300)
    assert proc.returncode == 0, stdout[-5000:] + stderr[-5000:]
    return [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)], root


@pytest.fixture(scope="module")
def single(ddp, tmp_path_factory):
    """name -> (notes, out dir) of RUNS in one process, run on demand, once (after the launch,
    which fills the cache)."""
    cache, done = ddp[1] / "cache", {}

    def get(name):
        if name not in done:
            out = tmp_path_factory.mktemp(name) / "out"
            with noting() as notes:
                assert train.main([*RUNS[name], "--cache-dir", str(cache), "--out-dir", str(out)]) == 0
            notes["weights"] = weights(notes.pop("model"))
            done[name] = notes, out
        return done[name]
    return get


def per_step(ranks: list[dict], key: str, steps: int) -> list[list]:
    """Each step's values of `key`, one per micro-batch, rank 0's first (a rank's share is contiguous)."""
    return [sum((r[key][s * len(r[key]) // steps:(s + 1) * len(r[key]) // steps] for r in ranks), [])
            for s in range(steps)]


def rows(ranks: list[dict], steps: int) -> list[list]:
    """The input rows of each step, in order."""
    return [sum(micro_batches, []) for micro_batches in per_step(ranks, "inputs", steps)]


def assert_close(got, want, rtol=RTOL, what=""):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, what
    err = np.max(np.abs(got - want) / np.abs(want))
    assert err <= rtol, f"{what}: max relative difference {err:.2e} > {rtol:g}"


def assert_weights_close(got: dict, want: dict, rtol=WEIGHTS_RTOL):
    for name, w in want.items():
        err = ((got[name] - w).norm() / w.norm()).item()
        assert err <= rtol, f"{name}: relative difference {err:.2e} > {rtol:g}"


# %% the same training as one process


@pytest.mark.parametrize("name", ["adamw-accum", "muon-batch", "adamw-batch"])
def test_two_processes_train_like_one(ddp, single, name):
    """Per step: the union of the ranks' micro-batches is exactly the one-process batch, the mean
    loss and the (clipped) gradient norm are the same; then the same evaluations and final weights.
    adamw-batch also stops at step 3 and resumes under torchrun on the way."""
    ranks, root = ddp[0], ddp[1]
    jobs = [r[name] for r in ranks]
    notes, out = single(name)
    assert [j["rc"] for j in jobs] == [[0] * len(JOBS[name][0])] * 2
    assert rows(jobs, STEPS) == rows([notes], STEPS)  # exactly the same tokens
    assert_close([np.mean(s) for s in per_step(jobs, "losses", STEPS)],
                 [np.mean(s) for s in per_step([notes], "losses", STEPS)], what="per-step training loss")
    assert jobs[0]["norms"] == jobs[1]["norms"]  # every rank clips by the same, global norm ...
    assert_close(jobs[0]["norms"], notes["norms"], what="gradient norm")  # ... the one-process one
    assert min(notes["norms"]) > 0.05  # so each step was clipped
    got, want = read_metrics(root / name / "out" / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 3, 6]
    for key in ("train_loss", "val_loss"):
        assert_close([r[key] for r in got], [r[key] for r in want], what=key)
    w0, w1 = (load_file(root / name / f"weights{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # the ranks hold identical weights
    saved = from_pretrained(root / name / "out" / "last").state_dict()
    assert all(torch.equal(w0[k], v) for k, v in saved.items())  # rank 0's are the ones saved
    assert_weights_close(w0, notes["weights"])


def test_gradients_sync_only_on_the_last_micro_step(ddp):
    ranks = ddp[0]
    assert [r["adamw-accum"]["no_sync"] for r in ranks] == [STEPS] * 2  # 2 micro-batches per rank and step
    assert [r["muon-batch"]["no_sync"] for r in ranks] == [0] * 2  # 1 micro-batch: nothing to skip


def test_muon_newton_schulz_is_split(ddp, single):
    """In training each rank orthogonalises half of each same-shape stack (rounded up); a Muon step
    on its own gives the same matrices as in one process."""
    ranks, root = ddp
    one = single("muon-batch")[0]["newton_schulz"]
    assert len(one) > 0 and all(n >= 2 for n in one)
    for r in ranks:
        assert r["muon-batch"]["newton_schulz"] == [-(-n // 2) for n in one]
    with noting() as notes:
        want = muon_steps()
    assert notes["newton_schulz"] == [5, 3, 1] * 2
    for r in (0, 1):
        assert ranks[r]["muon"]["newton_schulz"] == [3, 2, 1] * 2
        got = load_file(root / f"muon{r}.safetensors")
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)


def test_two_process_checkpoint_resumes_in_one_process(ddp, single, tmp_path):
    ranks, root = ddp
    jobs = [r["muon-accum"] for r in ranks]
    assert [j["rc"] for j in jobs] == [[0]] * 2
    assert "stopped at step 3 (--stop-at 3)" in jobs[0]["stdout"]
    notes, ref = single("muon-accum")
    assert rows(jobs, 3) == rows([notes], STEPS)[:3]
    out = shutil.copytree(root / "muon-accum" / "out", tmp_path / "out")
    with noting() as resumed:
        assert train.main(["--resume", "--out-dir", str(out)]) == 0
    assert rows([resumed], 3) == rows([notes], STEPS)[3:]
    assert_close([np.mean(s) for s in per_step(jobs, "losses", 3) + per_step([resumed], "losses", 3)],
                 [np.mean(s) for s in per_step([notes], "losses", STEPS)], what="per-step training loss")
    assert_close(jobs[0]["norms"] + resumed["norms"], notes["norms"], what="gradient norm")
    got, want = read_metrics(out / "metrics.jsonl"), read_metrics(ref / "metrics.jsonl")
    assert [r["step"] for r in got] == [0, 3, 6]
    assert_close([r["val_loss"] for r in got], [r["val_loss"] for r in want], what="val_loss")
    assert_weights_close(from_pretrained(out / "last").state_dict(), notes["weights"])


# %% decisions taken together, and what only rank 0 does


def test_inf_loss_on_one_rank_stops_both(ddp):
    """Only rank 1's loss is inf, at step 3: both ranks stop there with the same one-line error (step
    3, an evaluation step, is read before its evaluation: no step 4)."""
    jobs = [r["inf-on-rank-1"] for r in ddp[0]]
    assert [j["rc"] for j in jobs] == [[1]] * 2
    assert len(jobs[0]["norms"]) == len(jobs[1]["norms"]) == 3
    for j in jobs:
        assert j["stderr"].strip().splitlines() == [jobs[0]["stderr"].strip()]
        assert j["stderr"].startswith("error: loss is inf at step 3; stopped.")


def test_sigterm_on_one_rank_stops_both_at_the_same_step(ddp):
    ranks, root = ddp
    jobs = [r["sigterm-on-rank-1"] for r in ranks]
    assert [j["rc"] for j in jobs] == [[128 + signal.SIGTERM]] * 2
    assert len(jobs[0]["norms"]) == len(jobs[1]["norms"]) == 3  # the step under way was finished
    assert "stopped at step 3 (SIGTERM)" in jobs[0]["stdout"]
    assert json.loads((root / "sigterm-on-rank-1" / "out" / "last" / "training_state.json").read_text())["step"] == 3


def test_sigterm_to_torchrun_saves_and_resumes_in_one_process(ddp, tmp_path):
    """train.py itself under torchrun: SIGTERM to torchrun reaches both ranks, rank 0 saves last/,
    and one process continues from it."""
    out = tmp_path / "out"
    proc = torchrun(ROOT / "train.py", *TINY, "--cache-dir", ddp[1] / "cache", "--out-dir", out,
                    "--max-steps", "400", "--eval-every", "100")
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, finish(proc, 60)
        time.sleep(0.05)  # the step-0 evaluation is logged once the signal handlers are in place
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = finish(proc, 120)
    stopped = re.findall(r"stopped at step (\d+) \(SIGTERM\)", stdout)
    assert len(stopped) == 1, stdout + stderr  # said once: by rank 0
    step = json.loads((out / "last" / "training_state.json").read_text())["step"]
    assert int(stopped[0]) == step < 400
    assert train.main(["--resume", "--out-dir", str(out), "--max-steps", str(step + 2)]) == 0
    assert json.loads((out / "last" / "training_state.json").read_text())["step"] == step + 2


@pytest.mark.parametrize("name, message", [
    ("batch-does-not-split", "--batch-size 3 does not split over 2 processes"),
    ("accum-does-not-split", "--grad-accum 3 does not split over 2 processes")])
def test_global_batch_that_does_not_split(ddp, name, message):
    for r in ddp[0]:
        assert r[name]["rc"] == [1]
        lines = r[name]["stderr"].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_rank_0_alone_speaks_and_prepares_the_data_first(ddp):
    """On an empty cache rank 0 trains the tokenizer and tokenises; rank 1 starts reading only then."""
    ranks, root = ddp
    first = next(iter(JOBS))
    assert "training a byte-level BPE tokenizer" in ranks[0][first]["stdout"]
    assert "2 processes" in ranks[0][first]["stdout"]
    assert ranks[0][first]["cache_before"][0] == []
    assert [name.split("-")[0] for name in ranks[1][first]["cache_before"][0]] == ["bpe", "tokens"]
    for name in JOBS:
        assert ranks[1][name]["stdout"] == ""


if __name__ == "__main__":  # a rank of the torchrun launch in the `ddp` fixture
    sys.exit(rank_main(Path(sys.argv[1])))
