"""TPU slices by their Cloud TPU names, and their devices for ahead-of-time compilation.

``v5p-32``, ``v6e-256``, ``v5litepod-16`` (or ``v5e-16``), ``v4-64``: Cloud TPU counts TensorCores in
v4 and v5p names (two per chip, one JAX device per chip) and chips in v5e and v6e names. A shape can
be given directly too (``v5p:2x2x4``, ``v6e:16x16``). ``cpu:N`` stands for N host devices.

:func:`devices` returns the slice's devices without the hardware: ``jax[tpu]``'s compiler describes
the topology (``jax.experimental.topologies``), and a step compiled for those devices reports the
memory it would use on each chip.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from jaxtune.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation's facts (Cloud TPU's documentation)."""

    name: str  # as Cloud TPU names it: v5p, v6e, ...
    jax_name: str  # as the TPU compiler's topology names it
    cores_in_name: int  # TensorCores a chip adds to the slice's name (2: megacore chips)
    dims: int  # 3: a 3-D torus (v4, v5p); 2: a 2-D one (v5e, v6e)
    hbm_bytes: int  # per chip
    single_host_chips: tuple  # slice sizes (chips) served by one host; larger ones have 4 chips a host


GIB = 1 << 30
GENERATIONS = {
    "v4": Generation("v4", "v4", 2, 3, 32 * GIB, (4,)),
    "v5p": Generation("v5p", "v5", 2, 3, 95 * GIB, (4,)),
    "v5e": Generation("v5e", "v5e", 1, 2, 16 * GIB, (1, 4, 8)),
    "v6e": Generation("v6e", "v6e", 1, 2, 32 * GIB, (1, 4, 8)),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}

# Chip grids of the standard slice shapes, by chip count.
SHAPES_3D = {
    4: (2, 2, 1),
    8: (2, 2, 2),
    16: (2, 2, 4),
    32: (2, 4, 4),
    64: (4, 4, 4),
    128: (4, 4, 8),
    256: (4, 8, 8),
    512: (8, 8, 8),
    1024: (8, 8, 16),
    2048: (8, 16, 16),
    4096: (16, 16, 16),
}
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Slice:
    """A slice of TPU chips (or of host devices for ``cpu:N``), possibly repeated over ``num_slices``."""

    name: str
    generation: Generation | None  # None: host devices
    shape: tuple  # the chip grid
    num_slices: int = 1

    @property
    def chips(self) -> int:
        return math.prod(self.shape) * self.num_slices

    @property
    def hosts(self) -> int:
        if self.generation is None:
            return 1
        per_slice = math.prod(self.shape)
        if per_slice in self.generation.single_host_chips:
            return self.num_slices
        return self.num_slices * per_slice // 4

    @property
    def hbm_bytes(self) -> int:
        """Memory per device: the chip's HBM, or this host's RAM shared by its N devices."""
        if self.generation is None:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(self.chips, 1)
        return self.generation.hbm_bytes

    @property
    def device_kind(self) -> str:
        return self.generation.name if self.generation else "cpu"


def parse(name: str, num_slices: int = 1) -> Slice:
    """The slice a topology name means; a UsageError naming the accepted forms otherwise."""
    text = name.strip().lower()
    if num_slices < 1:
        raise UsageError(f"--num_slices {num_slices} must be at least 1")
    m = re.fullmatch(r"cpu:(\d+)", text)
    if m:
        if num_slices != 1:
            raise UsageError(f"--num_slices {num_slices}: host devices ({text}) form one slice")
        return Slice(text, None, (int(m.group(1)),), 1)
    m = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+)|:(\d+(?:x\d+)+))", text)
    gen_name = ALIASES.get(m.group(1), m.group(1)) if m else None
    if not m or gen_name not in GENERATIONS:
        raise UsageError(
            f"unknown topology {name!r}; use a Cloud TPU name ({', '.join(k + '-N' for k in GENERATIONS)}, "
            "v5litepod-N), a shape like v5p:2x2x4 or v6e:16x16, or cpu:N"
        )
    gen = GENERATIONS[gen_name]
    if m.group(3):
        shape = tuple(int(x) for x in m.group(3).split("x"))
        if len(shape) != gen.dims:
            raise UsageError(f"topology {name!r}: {gen.name} chips form a {gen.dims}-D grid")
    else:
        count = int(m.group(2))
        if count % gen.cores_in_name:
            raise UsageError(f"topology {name!r}: {gen.name} names count TensorCores, a multiple of 2")
        chips = count // gen.cores_in_name
        shapes = SHAPES_3D if gen.dims == 3 else SHAPES_2D
        if chips not in shapes:
            sizes = ", ".join(f"{gen.name}-{c * gen.cores_in_name}" for c in shapes)
            raise UsageError(f"topology {name!r} is not a standard slice; use one of {sizes}, or a shape")
        shape = shapes[chips]
    return Slice(text, gen, shape, num_slices)


def _host_bounds(s: Slice) -> tuple:
    """Chips per host as a 3-D box, as the TPU compiler takes it."""
    per_slice = math.prod(s.shape)
    if per_slice in s.generation.single_host_chips:
        grid = s.shape + (1,) * (3 - len(s.shape))
        return grid
    return (2, 2, 1)


def _wrap(s: Slice) -> tuple:
    """Which grid dimensions close into a ring (wraparound links): the full ones."""
    full = 4 if s.generation.dims == 3 else 16
    dims = s.shape + (1,) * (3 - len(s.shape))
    whole_cube = s.generation.dims == 3 and all(d % 4 == 0 for d in s.shape)
    return tuple(bool(d >= full and (whole_cube or s.generation.dims == 2)) for d in dims)


def devices(s: Slice) -> list:
    """The slice's devices: host CPU devices for ``cpu:N``, else the TPU compiler's abstract ones."""
    import jax

    if s.generation is None:
        have = jax.devices("cpu")
        if len(have) < s.chips:
            raise UsageError(
                f"--topology {s.name}: this process has {len(have)} CPU devices; jaxtune.plan sets "
                "XLA_FLAGS=--xla_force_host_platform_device_count for cpu:N when it starts, so run it "
                "as its own command"
            )
        return list(have[: s.chips])
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - part of jax
        raise UsageError(f"this jax has no topologies module ({e}); upgrade jax") from e
    grid = "x".join(map(str, s.shape))
    try:
        desc = topologies.get_topology_desc(
            platform="tpu",
            topology_name=f"{s.generation.jax_name}:{grid}",
            chip_config_name="megacore" if s.generation.cores_in_name == 2 else "default",
            chips_per_host_bounds=_host_bounds(s),
            num_slices=s.num_slices,
            wrap=_wrap(s),
        )
    except Exception as e:
        text = str(e).split("\n")[0]
        if "tpu" in text.lower() and ("not found" in text.lower() or "unknown backend" in text.lower()):
            raise UsageError(
                f"--topology {s.name} needs the TPU compiler: pip install -e '.[tpu]' ({text})"
            ) from e
        raise UsageError(f"--topology {s.name}: the TPU compiler refused it: {text}") from e
    return list(desc.devices)
