"""The measuring scripts run, and measure what they say: bench.py's decode rows and
benchmarks/gemv_layouts.py, on a tiny model, checked against an independent count of the bytes a
decoding step reads. (Speed itself is never asserted: it comes from these scripts, run alone.)"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from qwen3 import Qwen3Config

ROOT = Path(__file__).resolve().parent.parent


def step_bytes(cfg: Qwen3Config) -> int:
    """Every layer's seven projections and the head, float32, counted from the config alone."""
    h, hd, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    attn = h * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)  # q and o, k and v
    return 4 * (cfg.num_hidden_layers * (attn + 3 * h * i) + cfg.vocab_size * h)


def run(script, *args):
    out = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_gemv_layouts_measures_every_layout_over_the_steps_matrices(tmp_path):
    run("benchmarks/gemv_layouts.py", "--preset", "cpu", "--repeats", "1", "--passes", "1",
        "--json", str(tmp_path / "g.json"))
    res = json.loads((tmp_path / "g.json").read_text())
    assert res["step_bytes"] == step_bytes(Qwen3Config.preset("cpu"))
    assert len(res["layouts"]) == 4 and all(r["gb_per_s"] > 0 for r in res["layouts"].values())


def test_bench_decode_rows_report_bound_and_steps_alone(tmp_path):
    out = run("bench.py", "--preset", "cpu", "--vocab-size", "256", "--decode-tokens", "4", "--repeats", "1",
              "--decode-dtypes", "float32", "--skip", "train,forward,memory,muon", "--json", str(tmp_path / "b.json"))
    res = json.loads((tmp_path / "b.json").read_text())
    cfg = Qwen3Config.preset("cpu", vocab_size=256)
    rows = res["results"]
    assert set(rows) == {"decode, batch 1, greedy", "decode, batch 8, padded prompts"}
    reported = {"bound", "fraction_ours", "fraction_transformers", "steps_fraction_ours", "steps_fraction_transformers",
                "prefill_seconds_ours", "prefill_seconds_transformers"}  # measured values: present, never judged here
    for r in rows.values():
        assert r["weight_bytes_per_step"] == step_bytes(cfg)
        assert reported <= set(r)
    assert rows["decode, batch 1, greedy"]["repacked"]  # one float32 row on a CPU: the engine's packed copy
    assert not rows["decode, batch 8, padded prompts"]["repacked"]
    assert out.count("without the prompt") == 2 and out.count("packed weights") == 1


def test_bench_refuses_too_few_decode_tokens():
    out = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--decode-tokens", "1"], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2 and "at least 2" in out.stderr and "Traceback" not in out.stderr


def test_gpu_script_runs_every_section_at_tiny_shapes(tmp_path):
    """benchmarks/gpu.py is run on a GPU once, with no second try to spare: --quick runs every
    section on this CPU, and each records its numbers, not an error."""
    out = run("benchmarks/gpu.py", "--quick", "--repeats", "1", "--out", str(tmp_path))
    res = json.loads((tmp_path / "gpu.json").read_text())
    for section in ("peaks", "correctness", "decode", "default-run", "train", "decode-compiled"):
        assert "error" not in res[section] and "skipped" not in res[section], res[section]
    for name, checks in res["correctness"].items():
        assert all(v for k, v in checks.items() if k.startswith(("greedy", "padded", "sampled"))), (name, checks)
        assert checks["fp32_logits_rel_err"] < 1e-5
    assert {"tiny, batch 1", "tiny, batch 8"} <= set(res["decode"])
    assert res["decode-compiled"]["tiny, batch 1, compiled graph"]["greedy_agreement_with_eager_graph"] == 1.0
    assert res["train"]["tiny"]["eager"]["step_ms_ours"] > 0
    assert all(res["train"]["tiny, the update alone"][name]["step_ms"] > 0 for name in ("muon", "adamw"))
    assert {p.name for p in tmp_path.iterdir()} >= {"curves-muon.png", "curves-adamw.png", "metrics-muon.jsonl",
                                                    "run-adamw.log", "run-muon-eager-launches.log"}
    runs = res["default-run"]
    assert runs["muon, eager launches"]["steps"] == 20 and runs["muon"]["ms_per_step_warm"] > 0
    assert runs["waits in a step"] == dict(steps=20, steps_checked=0, waits=0, sites=[])  # counted on CUDA only
    assert "train.py's steps waited for the device 0 times in 0 steps checked" in out
    assert "default run muon:" in out and "default run muon, eager launches: 20 steps" in out
    assert "train tiny eager" in out and "decode tiny, batch 1, compiled graph" in out
    assert "train tiny, the update alone, muon: " in out


def test_gpu_summary_reads_partial_results_and_the_compile_break_even(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu
    eager = dict(step_ms_ours=30.0, step_ms_transformers=20.0, first_step_s_ours=0.5, first_step_s_transformers=0.5)
    compiled = dict(step_ms_ours=10.0, step_ms_transformers=25.0, first_step_s_ours=40.5, first_step_s_transformers=60)
    assert gpu.pays_after(eager, compiled, "ours") == 2000  # 40 s more at first, 20 ms less a step
    assert gpu.pays_after(eager, compiled, "transformers") is None  # compiled is slower: it never pays
    row = dict(tokens_per_s_ours=1000.0, tokens_per_s_transformers=500.0, ratio=2.0)
    res = dict(device="GPU", torch="2", transformers="5", date="today", peaks={"error": "RuntimeError: x"},
               decode={"seed, batch 1": {**row, "engine_mode": "graph"}, "error": "ValueError: y", "traceback": "..."},
               train={"seed": {"eager": {**row, **eager, "kernel_ms_ours": 7.5, "kernel_ms_transformers": 4.0},
                               "compiled": {**row, **compiled}, "graphs": {"error": "RuntimeError: capture"},
                               "compile_pays_after_steps": {"ours": 2000.0, "transformers": None}},
                      "update": {"muon": dict(step_ms=3.5, kernels=180, kernel_ms=1.25), "adamw": dict(step_ms=0.25)},
                      "update, failed": {"error": "RuntimeError: w"}, "error": "OutOfMemoryError: z"},
               **{"default-run": {"muon": {"error": "RuntimeError: train.py exited 1"}, "adamw": dict(
                   steps=600, best_val_bpb=1.5, ms_per_step=20.0, ms_per_step_warm=19.0, wall_s=30.0),
                   "waits in a step": dict(steps=30, steps_checked=29, waits=58, sites=["engine.py:12", "qwen3.py:34"])},
                  "decode-compiled": {"skipped": "skipped: 10 s left of the budget"}})
    text = gpu.summary(res)
    assert "decode seed, batch 1" in text and "2.00x" in text
    assert "train seed eager" in text and "train seed compiled" in text
    assert "compiling pays after 2,000 steps (ours), never (transformers)" in text
    assert "peaks: RuntimeError: x" in text and "decode: ValueError: y" in text and "train: OutOfMemoryError: z" in text
    assert "train seed graphs: RuntimeError: capture" in text
    assert "MFU" not in text and "2.00x, GPU busy 25% vs 20%" in text  # kernels' ms over the step's
    assert "train update, muon: 3.50 ms a step, its 180 kernels 1.25 ms" in text
    assert "train update, adamw: 0.25 ms a step" in text and "train update, failed: RuntimeError: w" in text
    assert "default run muon: RuntimeError: train.py exited 1" in text
    assert "default run adamw: 600 steps, 1.500 bpb, 20.0 ms a step (19.0 warm)" in text
    assert "decode-compiled: skipped: 10 s left" in text
    assert "train.py's steps waited for the device 58 times in 29 steps checked (engine.py:12, qwen3.py:34)" in text


def test_gpu_scripts_graphs_row_checks_then_times(monkeypatch):
    """The train section's graphs row runs only on CUDA, so here engine.cuda_graphed is stood in for
    by the eager loss itself (which the row's check must then find equal, to the last bit)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu
    recorded = []

    def stand_in(loss, batch_size, seq_len, dtype):
        recorded.append((batch_size, seq_len, dtype))
        return loss
    monkeypatch.setattr(gpu, "cuda_graphed", stand_in)
    monkeypatch.setattr(gpu, "RESULTS", {})
    cfg = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    out = {}
    gpu.train_rows(argparse.Namespace(repeats=1), torch.device("cpu"), cfg, 2, 64, compile_too=False, out=out,
                   graphs_too=True)
    assert recorded == [(2, 64, torch.bfloat16)]
    row = out["graphs"]
    assert row["graphs_loss_rel_diff"] == 0 and row["graphs_grad_rel_err"] == 0 and row["step_ms_ours"] > 0
    assert set(out) == {"eager", "graphs"}


def test_gpu_script_keeps_the_runs_beside_a_failing_one(tmp_path, monkeypatch):
    """A default run that fails (here the graphed Muon run, made to raise) costs that run alone."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu
    ran = []

    def one_run(run, flags, device, out_dir):
        ran.append(run.name)
        if run.name == "muon":
            raise RuntimeError("train.py exited 1: ['loss is nan at step 3']")
        return dict(numbers, records=[dict(step=0, val_loss=9.0), dict(step=50, val_loss=4.0)])
    numbers = dict(best_val_loss=4.0, best_val_bpb=1.5, best_step=50, steps=50, ms_per_step=20.0, ms_per_step_warm=19.0,
                   wall_s=3.0)
    monkeypatch.setattr(gpu, "one_run", one_run)
    monkeypatch.setattr(gpu, "step_waits", lambda run, flags, device, out_dir: ran.append(run.name) or {})
    monkeypatch.setattr(gpu, "RESULTS", {})
    runs = gpu.default_run(argparse.Namespace(out=str(tmp_path), quick=False), torch.device("cpu"))
    assert ran == ["muon", "adamw", "muon-eager-launches", "waits"]
    assert runs["muon"] == {"error": "RuntimeError: train.py exited 1: ['loss is nan at step 3']"}
    assert runs["adamw"] == runs["muon, eager launches"] == numbers  # records dropped
    assert "muon_reaches_adamw_final_at_step" not in runs


def test_ops_counts_what_each_path_dispatches(monkeypatch):
    """benchmarks/ops.py on fake tensors: the plain loss dispatches as many operations for any batch
    (one product, one cross-entropy), the chunked loss more by one chunk's for each 256 rows more,
    the graph's decode step fewer than the chapter's forward pass (which grows its cache by
    concatenation and computes RoPE's angles afresh at every token), and our optimizer update fewer
    than with torch.optim.Muon (which goes matrix by matrix)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import ops
    small = ["--preset", "cpu", "--vocab-size", "512", "--seq-len", "256", "--batch-size"]
    one, two, three = (ops.main(small + [str(b)]) for b in (1, 2, 3))
    plain, chunks = "training step, ours, plain logits (a GPU's path)", "training step, ours, 256-row chunks (a CPU's path)"
    assert one[plain] == two[plain] == three[plain] < one[chunks]
    assert three[chunks] - two[chunks] == two[chunks] - one[chunks] > 0  # one chunk's worth, each time
    assert one["decoded token, ours, the graph's fixed-shape step"] < one["decoded token, ours, the chapter's forward pass"]
    assert one["optimizer update, ours: clipping, FastMuon, AdamW"] < \
        one["optimizer update, torch.optim.Muon in FastMuon's place"]


def test_the_optimizer_update_dispatches_per_shape_not_per_matrix(monkeypatch):
    """train.py's update (clipping, Muon, AdamW) dispatches as many operations for three layers as for
    one: every operation is a foreach or fused one over all its tensors, or Muon's over a stack of
    one shape. A per-matrix operation (a momentum buffer built at every step, as a setdefault did;
    a look-ahead lerp matrix by matrix) would cost a launch per matrix on a GPU, every step."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import ops
    from engine import FastMuon
    from qwen3 import Muon, Qwen3
    for muon in (Muon, FastMuon):
        with FakeTensorMode():
            one, three = (ops.optimizer_update(Qwen3(Qwen3Config.preset("cpu", num_hidden_layers=n)), muon)
                          for n in (1, 3))
        assert one == three and "zeros_like" not in one, (muon, three - one)


def test_gpu_script_keeps_what_a_failing_section_measured(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu
    configs = dict(list(gpu.CORRECTNESS_CONFIGS.items())[:1], broken=dict(num_attention_heads=3))  # 3 heads, 2 kv heads
    monkeypatch.setattr(gpu, "CORRECTNESS_CONFIGS", configs)
    monkeypatch.setattr(sys, "argv", ["gpu.py", "--quick", "--only", "correctness", "--out", str(tmp_path)])
    gpu.main()
    res = json.loads((tmp_path / "gpu.json").read_text())["correctness"]
    assert res["gqa_hd24"]["greedy_chapter_equals_transformers"] is True  # measured before the failure, kept
    assert "broken" not in res and res["error"].startswith("ValueError")
