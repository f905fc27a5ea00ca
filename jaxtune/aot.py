"""Whether a config fits a topology, before paying for it: the real train step, lowered from the
run's abstract plan (:mod:`jaxtune.plan`) on the topology's devices and compiled by the target's own
compiler, reports the memory each device would hold; the model FLOPs give the step time at a given MFU.

Nothing is allocated: the parameters, optimizer state and batch are shapes with shardings.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

from jaxtune import mfu
from jaxtune.errors import FAILED, JaxtuneError
from jaxtune.topology import Slice

MFU_POINTS = (0.4, 0.6)


class DoesNotFit(JaxtuneError, RuntimeError):
    """The step needs more memory per device than the chip has."""

    exit_code = FAILED


@dataclasses.dataclass
class Report:
    topology: str
    device_kind: str
    devices: int
    hosts: int
    mesh: dict
    seq_len: int
    batch_size: int
    per_device_bytes: dict  # arguments, outputs, temporaries, aliased, code, total
    hbm_bytes_per_device: int
    parameters: int
    flops_per_step: float
    peak_flops_per_device: float
    compile_seconds: float
    measured: str  # how the memory was obtained: compiled | refused by the compiler | from the shardings
    remat: str = "none"
    param_dtype: str = "float32"

    @property
    def fits(self) -> bool:
        return self.per_device_bytes["total"] <= self.hbm_bytes_per_device

    def step_seconds(self, utilisation: float) -> float | None:
        if not self.peak_flops_per_device:
            return None
        return self.flops_per_step / (utilisation * self.peak_flops_per_device * self.devices)

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["fits"] = self.fits
        out["at_mfu"] = {}
        for u in MFU_POINTS:
            seconds = self.step_seconds(u)
            tokens = self.batch_size * self.seq_len / seconds if seconds else None
            out["at_mfu"][f"{u:.0%}"] = {"step_seconds": seconds, "tokens_per_second": tokens}
        return out

    def table(self) -> str:
        gib = 1 << 30
        b = self.per_device_bytes
        mesh = " x ".join(f"{k} {v}" for k, v in self.mesh.items())
        lines = [
            f"topology     {self.topology}: {self.devices} devices ({self.device_kind}), "
            f"{self.hosts} host(s)",
            f"mesh         {mesh}",
            f"batch        {self.batch_size} x {self.seq_len} tokens; "
            f"{self.parameters / 1e9:.3g} B parameters",
            "memory per device:",
            f"  arguments    {b['arguments'] / gib:9.2f} GiB  (parameters, optimizer state, batch)",
            f"  outputs      {b['outputs'] / gib:9.2f} GiB",
            f"  aliased      {-b['aliased'] / gib:9.2f} GiB  (outputs written over donated arguments)",
            f"  temporaries  {b['temporaries'] / gib:9.2f} GiB  (activations, gradients, collectives)",
            f"  code         {b['code'] / gib:9.2f} GiB",
            f"  total        {b['total'] / gib:9.2f} GiB  of {self.hbm_bytes_per_device / gib:.2f} GiB: "
            + ("fits" if self.fits else "DOES NOT FIT"),
            f"FLOPs a step {self.flops_per_step:.3e} (model FLOPs, as the MFU figure counts them, with"
            " every token through the output layer)",
        ]
        for u in MFU_POINTS:
            seconds = self.step_seconds(u)
            if seconds:
                tokens = self.batch_size * self.seq_len / seconds
                lines.append(f"at {u:.0%} MFU    {seconds:.3f} s a step, {tokens:,.0f} tokens/s")
        if self.measured == "compiled":
            lines.append(f"(compiled for the target in {self.compile_seconds:.1f} s)")
        elif self.measured == "refused by the compiler":
            lines.append("(the target's compiler refused the program as too big; temporaries: its figure)")
        else:
            lines.append("(not compiled: the parameters and optimizer state alone overflow a device)")
        return "\n".join(lines)

    def advice(self) -> str:
        """One line: the largest part of the memory and what to change."""
        b = self.per_device_bytes
        part = max(
            ("arguments", "temporaries", "outputs"),
            key=lambda k: b[k] - (b["aliased"] if k == "outputs" else 0),
        )
        gib = 1 << 30
        need = f"{b['total'] / gib:.1f} GiB a device, {self.hbm_bytes_per_device / gib:.1f} GiB available"
        if part == "arguments":
            fixes = [
                "shard the parameters and optimizer state over more devices "
                "(a larger mesh.fsdp, or a larger topology)"
            ]
            if self.param_dtype != "bfloat16":
                fixes.append("store parameters in bfloat16 (model.param_dtype)")
        else:
            fixes = [] if self.remat == "full" else ["rematerialise the layers (model.remat = 'full')"]
            fixes += [
                "use a smaller micro-batch (train.grad_accum_steps)",
                "split the activations with tensor parallelism (mesh.tensor)",
                "shorter rows (data.seq_len)",
            ]
        fix = ", or ".join(fixes)
        largest = f"the largest part is {part} ({b[part] / gib:.1f} GiB)"
        return f"the step does not fit {self.topology}: {need}; {largest}; {fix}"


def _parameters(plan) -> int:
    import jax

    leaves = jax.tree.leaves({k: plan.abstract[k] for k in ("params", "frozen")})
    return sum(math.prod(x.shape) for x in leaves)


def _state_bytes_per_device(plan, batch: dict) -> int:
    """The step's arguments on the most loaded device, from the shardings alone (no layout padding)."""
    import jax

    trees = [plan.abstract[k] for k in ("params", "frozen", "opt_state", "step")] + [batch]
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(trees))


_EXHAUSTED = re.compile(r"memory required for ([A-Za-z ]+?) \(([\d.]+)([KMGT]?)\)")


def _compile(lowered):
    """(compiled, None), or (None, bytes the compiler said the temporaries need) when it ran out of
    memory: a TPU compiler refuses a program that cannot fit, and its message has the size."""
    try:
        return lowered.compile(), None
    except Exception as e:
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text:
            raise
        m = _EXHAUSTED.search(text)
        scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
        return None, int(float(m.group(2)) * scale[m.group(3)]) if m else -1


def report(config, where: Slice, devices, p) -> Report:
    """Compile the train step of the plan ``p`` (made on a mesh of ``devices``, the slice ``where``)
    for them, and read off the memory each device needs. When the parameters and optimizer state
    alone overflow a device, or the compiler finds the program too big, the numbers come from the
    shardings and the compiler's message instead of a finished compile."""
    from jaxtune.config import mesh_shape

    length = config.data.seq_len
    state = _state_bytes_per_device(p, p.batch_spec(length))
    parts = {"arguments": state, "outputs": state, "temporaries": 0, "aliased": state, "code": 0}
    measured = "from the shardings"
    start = time.perf_counter()
    if state <= where.hbm_bytes:
        measured = "refused by the compiler"
        compiled, needed = _compile(p.lower(length))
        if compiled is not None:
            measured = "compiled"
            mem = compiled.memory_analysis()
            parts = {
                "arguments": int(mem.argument_size_in_bytes),
                "outputs": int(mem.output_size_in_bytes),
                "temporaries": int(mem.temp_size_in_bytes),
                "aliased": int(mem.alias_size_in_bytes),
                "code": int(getattr(mem, "generated_code_size_in_bytes", 0)),
            }
        elif needed > 0:
            parts["temporaries"] = needed
        else:  # the compiler gave no size: the program needs more than the device at least
            parts["temporaries"] = where.hbm_bytes
    took = time.perf_counter() - start
    # Donated state is written in place: its output bytes are the argument bytes, counted once.
    parts["total"] = (
        parts["arguments"] + parts["outputs"] - parts["aliased"] + parts["temporaries"] + parts["code"]
    )
    tokens = config.train.batch_size * length
    flops = mfu.flops_per_token(p.spec.cfg, length, p.objective.causal) * tokens
    peak = mfu.datasheet_peak(devices[0].device_kind, config.model.compute_dtype) if where.generation else 0.0
    return Report(
        topology=where.name + (f" x {where.num_slices} slices" if where.num_slices > 1 else ""),
        device_kind=devices[0].device_kind,
        devices=len(devices),
        hosts=where.hosts,
        mesh=mesh_shape(config, len(devices)),
        seq_len=length,
        batch_size=config.train.batch_size,
        per_device_bytes=parts,
        hbm_bytes_per_device=where.hbm_bytes,
        parameters=_parameters(p),
        flops_per_step=flops,
        peak_flops_per_device=peak,
        compile_seconds=took,
        measured=measured,
        remat=config.model.remat,
        param_dtype=config.model.param_dtype,
    )
