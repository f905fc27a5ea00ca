"""MFU of jaxtune's real train step on one GPU: a ~1B Llama (Llama-3.2-1B's shapes, random weights) in
bfloat16, with each attention implementation and remat choice, on synthetic full rows (and packed
rows of 4 documents each, whose mask reaches cuDNN as a dense bias).

    bash benchmarks/gpu_mfu.sh [--batch 8] [--seq-len 2048] [--steps 10] [--json FILE]
        [--variants cudnn:dots,cudnn:none:packed] [--budget SECONDS] [--profile FOLDER]

Each variant builds the plan of a config (preset llama3.2-1b, float32 master weights and AdamW state,
bfloat16 compute) exactly as `python -m jaxtune.train` does, compiles the step, runs two untimed steps
and then times ``--steps`` steps (the clock stops on the last step's metrics). MFU is the model FLOPs
of jaxtune's `mfu.flops_per_token` (6 x matmul parameters + attention, remat not counted) over the
datasheet bfloat16 dense peak of the device (`mfu.PEAK_FLOPS`; an H200 is 989 TFLOP/s). A variant
that does not compile or runs out of memory is reported as such and the others go on. ``--profile``
traces three more steps of each variant and prints its kernels by device time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL = "llama3.2-1b"  # a preset (jaxtune/models/presets.py)
VARIANTS = (  # attention:remat[:packed], the likely fastest first (a time budget may cut the list)
    "cudnn:none",
    "xla:none",
    "cudnn:dots",
    "cudnn:none:packed",
    "cudnn:full",
    "reference:none",
)
DOCUMENTS = 4  # documents per row in a packed variant (its mask goes to cuDNN as a dense bias)


def variant(
    attention: str,
    remat: str,
    batch: int,
    seq_len: int,
    steps: int,
    model: str = MODEL,
    packed: bool = False,
    profile: str = "",
) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxtune import mfu, sharding
    from jaxtune.config import defaults
    from jaxtune.logical import activation_sharding
    from jaxtune.plan import plan

    c = defaults()
    c.model.path = model
    c.model.compute_dtype = "bfloat16"
    c.model.attention = attention
    c.model.remat = remat
    if packed:
        c.data.format, c.data.packing = "chat", True
    c.data.seq_len = seq_len
    c.train.batch_size = batch
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    devices = jax.devices()[:1]
    p = plan(c, sharding.make_mesh(c, devices), total_steps=100)
    state, frozen = p.materialise()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, p.spec.cfg.vocab_size, (batch, seq_len + 1), dtype=np.int32)
    host = {
        "input_ids": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "attention_mask": np.ones((batch, seq_len), np.int32),
        "loss_mask": np.ones((batch, seq_len), np.float32),
    }
    if packed:
        documents = np.arange(seq_len) * DOCUMENTS // seq_len
        host["segment_ids"] = np.broadcast_to(documents, (batch, seq_len)).astype(np.int32)
    batch_arrays = {k: jax.device_put(v, p.batch_sharding) for k, v in host.items()}
    with activation_sharding(p.mesh, p.rules):
        t0 = time.perf_counter()
        step = p.lower(seq_len).compile()
        compile_s = time.perf_counter() - t0
        memory = step.memory_analysis()
        for _ in range(2):
            state, metrics = step(state, frozen, batch_arrays)
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, frozen, batch_arrays)
        loss = float(jax.device_get(metrics["loss"]))
        seconds = (time.perf_counter() - t0) / steps
        if profile:  # three more steps under the profiler, after the timed ones
            with jax.profiler.trace(profile, create_perfetto_trace=True):
                for _ in range(3):
                    state, metrics = step(state, frozen, batch_arrays)
                jax.block_until_ready(metrics)
    flops = mfu.flops_per_token(p.spec.cfg, seq_len) * batch * seq_len
    peak = mfu.datasheet_peak(devices[0].device_kind, "bfloat16")
    return {
        "attention": attention,
        "remat": remat,
        "packed": packed,
        "batch": batch,
        "seq_len": seq_len,
        "step_seconds": seconds,
        "tokens_per_second": batch * seq_len / seconds,
        "tflops_per_second": flops / seconds / 1e12,
        "mfu": flops / seconds / peak if peak else None,
        "compile_seconds": compile_s,
        "temp_gib": memory.temp_size_in_bytes / 2**30 if memory is not None else None,
        "loss": loss,
        "finite": bool(jnp.isfinite(loss)),
    }


def kernel_table(folder: str, top: int = 25) -> str:
    """The device time of a profile (its perfetto trace) by kernel name, largest first, with each
    kernel's share of all device time; the names are XLA's fusions, cuBLAS's and cuDNN's kernels."""
    import glob
    import gzip
    from collections import Counter

    (path,) = glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    gpu = {
        e["pid"]
        for e in events
        if e.get("ph") == "M"
        and e.get("name") == "process_name"
        and "GPU" in str(e.get("args", {}).get("name"))
    }
    time_by_name, calls = Counter(), Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu:
            time_by_name[e["name"]] += e.get("dur", 0)
            calls[e["name"]] += 1
    total = sum(time_by_name.values()) or 1
    lines = [f"device time {total / 1e3:.1f} ms over {len(gpu)} GPU tracks"]
    for name, us in time_by_name.most_common(top):
        lines.append(f"{us / total:6.1%} {us / 1e3:9.2f} ms {calls[name]:6d} x  {name[:110]}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--variants", default="", help="comma-separated attention:remat[:packed], default all (VARIANTS)"
    )
    parser.add_argument(
        "--budget", type=float, default=480, help="seconds; no variant is started after this many"
    )
    parser.add_argument("--json", default="")
    parser.add_argument(
        "--profile", default="", help="folder: trace 3 more steps of each variant and print its top kernels"
    )
    args = parser.parse_args()
    import jax

    device = jax.devices()[0]
    if device.platform != "gpu":
        print(
            f"gpu_mfu: no GPU here (JAX sees {device.platform}); run it on a machine with one",
            file=sys.stderr,
        )
        return 2
    chosen = [v for v in args.variants.split(",") if v] or list(VARIANTS)
    print(
        f"{device.device_kind}, jax {jax.__version__}, "
        f"batch {args.batch} x {args.seq_len}, {args.steps} steps"
    )
    print(
        f"{'attention':10s} {'remat':6s} {'rows':6s} {'step s':>7s} {'tokens/s':>9s} {'TFLOP/s':>8s} "
        f"{'MFU':>6s} {'compile s':>9s}"
    )
    results, start = [], time.perf_counter()
    for spec in chosen:
        attention, remat, *rest = spec.split(":")
        packed = rest == ["packed"]
        rows = "packed" if packed else "full"
        if time.perf_counter() - start > args.budget:
            print(
                f"{attention:10s} {remat:6s} {rows:6s} not run: past the {args.budget:.0f} s budget",
                flush=True,
            )
            continue
        try:
            folder = os.path.join(args.profile, spec.replace(":", "_")) if args.profile else ""
            r = variant(attention, remat, args.batch, args.seq_len, args.steps, packed=packed, profile=folder)
        except Exception as e:  # a variant that does not fit or compile: say so, go on  # noqa: BLE001
            traceback.print_exc()
            r = {
                "attention": attention,
                "remat": remat,
                "packed": packed,
                "error": str(e).splitlines()[0][:200],
            }
            print(f"{attention:10s} {remat:6s} {rows:6s} failed: {r['error']}", flush=True)
        else:
            mfu_text = f"{r['mfu']:6.1%}" if r["mfu"] is not None else "     ?"
            print(
                f"{attention:10s} {remat:6s} {rows:6s} {r['step_seconds']:7.3f} "
                f"{r['tokens_per_second']:9.0f} {r['tflops_per_second']:8.1f} {mfu_text} "
                f"{r['compile_seconds']:9.1f}",
                flush=True,
            )
        if args.profile and "error" not in r:
            try:
                print(kernel_table(folder), flush=True)
            except Exception:  # a profile that cannot be read costs the table, not the run  # noqa: BLE001
                traceback.print_exc()
        results.append(r)
        if args.json:  # after each variant: a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(
                    {"device": device.device_kind, "jax": jax.__version__, "results": results}, f, indent=2
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
