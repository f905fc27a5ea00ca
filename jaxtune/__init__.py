"""jaxtune: fine-tune and pre-train pretrained language models with JAX and Flax NNX.

The package's face is lazy: ``import jaxtune.config`` (a config file, ``--help``) loads neither JAX nor
Flax; ``jaxtune.load_pretrained`` and the others import their modules on first use.
"""

import importlib
import sys
import types

_EXPORTS = {
    "generate": "jaxtune.generate",
    "generate_ids": "jaxtune.generate",
    "load_pretrained": "jaxtune.pretrained",
    "load_tokenizer": "jaxtune.pretrained",
    "save_pretrained": "jaxtune.pretrained",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxtune' has no attribute {name!r}")


class _Face(types.ModuleType):
    """The package module. Importing the submodule ``jaxtune.generate`` would set the package's
    ``generate`` to that module, hiding the function of the same name; this keeps the function."""

    def __setattr__(self, name, value):
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Face
