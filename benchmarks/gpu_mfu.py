"""MFU of jaxtune's real train step on one GPU: a ~1B Llama (Llama-3.2-1B's shapes, random weights) in
bfloat16, with each attention implementation and remat choice, on synthetic full rows.

    bash benchmarks/gpu_mfu.sh [--batch 8] [--seq-len 2048] [--steps 10] [--json FILE]

Each variant builds the plan of a config (preset llama3.2-1b, float32 master weights and AdamW state,
bfloat16 compute) exactly as `python -m jaxtune.train` does, compiles the step, runs two untimed steps
and then times ``--steps`` steps (the clock stops on the last step's metrics). MFU is the model FLOPs
of jaxtune's `mfu.flops_per_token` (6 x matmul parameters + attention, remat not counted) over the
datasheet bfloat16 dense peak of the device (`mfu.PEAK_FLOPS`; an H200 is 989 TFLOP/s). A variant
that does not compile or runs out of memory is reported as such and the others go on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL = "llama3.2-1b"  # a preset (jaxtune/models/presets.py)
VARIANTS = (  # (attention, remat)
    ("xla", "none"),
    ("cudnn", "none"),
    ("cudnn", "dots"),
    ("cudnn", "full"),
    ("reference", "none"),
)


def variant(attention: str, remat: str, batch: int, seq_len: int, steps: int, model: str = MODEL) -> dict:
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
    flops = mfu.flops_per_token(p.spec.cfg, seq_len) * batch * seq_len
    peak = mfu.datasheet_peak(devices[0].device_kind, "bfloat16")
    return {
        "attention": attention,
        "remat": remat,
        "step_seconds": seconds,
        "tokens_per_second": batch * seq_len / seconds,
        "tflops_per_second": flops / seconds / 1e12,
        "mfu": flops / seconds / peak if peak else None,
        "compile_seconds": compile_s,
        "temp_gib": memory.temp_size_in_bytes / 2**30 if memory is not None else None,
        "loss": loss,
        "finite": bool(jnp.isfinite(loss)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", default="", help="comma-separated attention:remat, default all")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    import jax

    device = jax.devices()[0]
    if device.platform != "gpu":
        print(
            f"gpu_mfu: no GPU here (JAX sees {device.platform}); run it on a machine with one",
            file=sys.stderr,
        )
        return 2
    chosen = [tuple(v.split(":")) for v in args.variants.split(",") if v] or list(VARIANTS)
    print(
        f"{device.device_kind}, jax {jax.__version__}, "
        f"batch {args.batch} x {args.seq_len}, {args.steps} steps"
    )
    print(
        f"{'attention':10s} {'remat':6s} {'step s':>7s} {'tokens/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s} "
        f"{'compile s':>9s}"
    )
    results = []
    for attention, remat in chosen:
        try:
            r = variant(attention, remat, args.batch, args.seq_len, args.steps)
        except Exception as e:  # a variant that does not fit or compile: say so, go on  # noqa: BLE001
            r = {"attention": attention, "remat": remat, "error": str(e).splitlines()[0][:200]}
            print(f"{attention:10s} {remat:6s} failed: {r['error']}", flush=True)
        else:
            mfu_text = f"{r['mfu']:6.1%}" if r["mfu"] is not None else "     ?"
            print(
                f"{attention:10s} {remat:6s} {r['step_seconds']:7.3f} {r['tokens_per_second']:9.0f} "
                f"{r['tflops_per_second']:8.1f} {mfu_text} {r['compile_seconds']:9.1f}",
                flush=True,
            )
        results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device.device_kind, "jax": jax.__version__, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
