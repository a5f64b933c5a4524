"""Fixes to the pinned transformers that change what a model computes, applied whenever its module is imported.

transformers 4.57's native DeepSeek-V2 attention leaves out the YaRN softmax scale that DeepSeek's own modelling
code applies (softmax scale = qk_head_dim^-0.5 x mscale(factor, mscale_all_dim)^2; 1.59x for DeepSeek-V2-Lite's
factor 40 and mscale_all_dim 0.707). llama.cpp applies it (`rope.scaling.yarn_log_multiplier`), so without it torch
and the GGUF disagree from the second position on, and calibration, the teacher cache and distillation run a model
other than the released one. transformers fixed it later (huggingface/transformers#47435); the patch is applied only
where the attention's __init__ does not read `mscale_all_dim` itself.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import inspect
import math
import sys

DEEPSEEK_V2 = "transformers.models.deepseek_v2.modeling_deepseek_v2"


def yarn_softmax_mscale(config) -> float:
    """DeepSeek's factor on the softmax scale for a YaRN rope_scaling with mscale_all_dim (1.0 otherwise)."""
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    factor, all_dim = float(scaling.get("factor") or 1.0), float(scaling.get("mscale_all_dim") or 0.0)
    if kind != "yarn" or not all_dim or factor <= 1.0:
        return 1.0
    return (0.1 * all_dim * math.log(factor) + 1.0) ** 2


def _patch_deepseek_v2(module) -> None:
    attention = module.DeepseekV2Attention
    original = attention.__init__
    if getattr(original, "_edgeconv_mscale", False) or "mscale_all_dim" in inspect.getsource(original):
        return

    def __init__(self, config, *args, **kwargs):
        original(self, config, *args, **kwargs)
        self.scaling = self.scaling * yarn_softmax_mscale(config)

    __init__._edgeconv_mscale = True
    attention.__init__ = __init__


PATCHES = {DEEPSEEK_V2: _patch_deepseek_v2}


class _PatchOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the patched modules through the other finders, then patches each right after it runs."""

    def find_spec(self, name, path=None, target=None):
        if name not in PATCHES:
            return None
        sys.meta_path.remove(self)  # the real spec, from everyone else
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        self._loaders = getattr(self, "_loaders", {})
        self._loaders[name] = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loaders[spec.name].create_module(spec)

    def exec_module(self, module):
        self._loaders[module.__name__].exec_module(module)
        PATCHES[module.__name__](module)


def install() -> None:
    """Patch the modules already imported, and the others when they are (idempotent)."""
    for name, patch in PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
    if not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
