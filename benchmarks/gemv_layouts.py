"""
How fast the matrix-vector work of one decoding step streams in each layout the engine's step
could read the weights in: the measurements behind its choices (CPU). The model's own matrices
(random weights of the preset's shapes), every layout in the same interleaved rounds, each pass
the products of one step in a step's order through engine.project, the function the step multiplies with.

    python benchmarks/gemv_layouts.py                         # the seed config, one row, float32
    python benchmarks/gemv_layouts.py --rows 8                # eight rows (a batch)
    python benchmarks/gemv_layouts.py --dtype float16
    python benchmarks/gemv_layouts.py --preset qwen3-0.6b --repeats 3    # 2.4 GB a pass, and as much again repacked

Layouts: nn.Linear's (out, in) weights as F.linear reads them (h @ W^T, what the readable model
does); views of them cut into k row blocks, one per thread (k = torch.get_num_threads()), through
torch.bmm; a repacked copy, q/k/v and gate/up fused, as one contiguous (in, out) matrix; and that
copy cut into k contiguous column blocks. The engine reads the last where it packs (engine.should_pack),
the k views elsewhere, one block for float16 and on GPUs.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import decode_weights, project  # noqa: E402
from qwen3 import PRESETS, Qwen3, Qwen3Config  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="seed", choices=list(PRESETS), help="model shape, with its own vocabulary")
    p.add_argument("--rows", type=int, default=1, help="vectors per product (the batch)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds (the median is kept)")
    p.add_argument("--passes", type=int, default=5, help="steps' worth of products per timed round")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    return p.parse_args()


def main():
    args = parse_args()
    if args.rows < 1 or args.repeats < 1 or args.passes < 1:
        sys.exit("error: --rows, --repeats and --passes must be at least 1")
    dtype, k = getattr(torch, args.dtype), torch.get_num_threads()
    torch.manual_seed(0)
    model = Qwen3(Qwen3Config.preset(args.preset)).to(dtype).eval()
    with torch.no_grad():
        layouts = {  # each layout's matrices, in the order a step reads them
            "F.linear, (out, in) weights": decode_weights(model, 1, pack=False).matrices(),  # one block: h @ W^T
            f"views, {k} row blocks": decode_weights(model, k, pack=False).matrices(),
            "repacked, one (in, out) matrix": [m.contiguous() for m in decode_weights(model, 1, pack=True).matrices()],
            f"repacked, {k} column blocks": decode_weights(model, k, pack=True).matrices(),
        }
    step_bytes = sum(m.numel() * m.element_size() for m in layouts["F.linear, (out, in) weights"])
    inputs = {name: [torch.randn(args.rows, m.size(1), dtype=dtype) for m in mats] for name, mats in layouts.items()}
    times = {name: [] for name in layouts}
    with torch.no_grad():
        for rnd in range(args.repeats + 1):  # the first round warms up
            for name, mats in layouts.items():
                t0 = time.perf_counter()
                for _ in range(args.passes):
                    for m, x in zip(mats, inputs[name]):
                        project(x, m)
                if rnd:
                    times[name].append((time.perf_counter() - t0) / args.passes)
    base = statistics.median(times["F.linear, (out, in) weights"])
    print(f"{args.preset}, {args.rows} row(s), {args.dtype}, {k} threads: {step_bytes / 1e6:,.0f} MB of matrices a step")
    res = {"preset": args.preset, "rows": args.rows, "dtype": args.dtype, "threads": k, "step_bytes": step_bytes,
           "torch": torch.__version__, "layouts": {}}
    for name in layouts:
        t = statistics.median(times[name])
        res["layouts"][name] = {"ms": 1000 * t, "gb_per_s": step_bytes / t / 1e9, "speedup_over_linear": base / t}
        print(f"  {name:<34} {1000 * t:8.2f} ms   {step_bytes / t / 1e9:5.1f} GB/s   {base / t:5.2f}x F.linear")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
