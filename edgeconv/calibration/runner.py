"""Run a causal LM one decoder layer at a time, with only that layer's weights in memory.

The model is built on the meta device (no memory). One pass with every decoder layer replaced by a
recorder captures, per batch, the exact arguments transformers hands each layer (causal or sliding-window
masks, rotary position embeddings, cache positions), and the embeddings. Then, for each layer in turn:
load its weights from the files, push the hidden states of all batches through it, and free it. Peak
memory is one layer plus the activations; the activations live in a file-backed tensor when they would
not fit in the allowed memory.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from edgeconv.families.base import MoEFamily
from edgeconv.io.checkpoint import Checkpoint


class _Stop(Exception):
    pass


class _Recorder(torch.nn.Module):
    """Stands in for decoder layer `index`: records its keyword arguments and passes hidden states on."""

    def __init__(self, index: int, last: int, store: dict, original: torch.nn.Module, as_tuple: bool):
        super().__init__()
        self.index, self.last, self.store, self.as_tuple = index, last, store, as_tuple
        if hasattr(original, "attention_type"):
            self.attention_type = original.attention_type  # GPT-OSS picks the mask by it

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise RuntimeError("decoder layers are expected to get keyword arguments only")
        self.store[self.index] = kwargs
        if self.index == 0:
            self.store["embeddings"] = hidden_states
        if self.index == self.last:
            raise _Stop
        return (hidden_states,) if self.as_tuple else hidden_states


class ActivationStore:
    """Hidden states of all calibration sequences [n, seq, hidden]: in memory, or in a file-backed tensor."""

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, max_bytes: int, spill_dir: Path | None = None):
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        self.spilled = nbytes > max_bytes
        if self.spilled:
            self._dir = tempfile.TemporaryDirectory(prefix="edgeconv-acts-", dir=spill_dir)
            path = Path(self._dir.name) / "activations.bin"
            self.data = torch.from_file(str(path), shared=True, size=math.prod(shape), dtype=dtype).view(shape)
        else:
            self.data = torch.empty(shape, dtype=dtype)


def build_skeleton(ckpt: Checkpoint, dtype: torch.dtype):
    """The model on the meta device, with real embeddings and rotary embedding."""
    config = AutoConfig.from_pretrained(ckpt.path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)
    base = model.model
    base.embed_tokens.load_state_dict({"weight": ckpt.read("model.embed_tokens.weight").to(dtype)}, assign=True)
    base.rotary_emb = type(base.rotary_emb)(config=model.config)  # buffers computed on the CPU, not meta
    return model


def _layer_weights(ckpt: Checkpoint, family: MoEFamily, layer: int, moe: bool, dtype: torch.dtype) -> dict:
    prefix = f"{family.prefix(layer)}."
    return {
        name[len(prefix):]: ckpt.read(name).to(dtype)
        for name in ckpt.names()
        if name.startswith(prefix) and not (moe and family.owns(name, layer))
    }


def _moe_module(layer_module: torch.nn.Module, family: MoEFamily) -> torch.nn.Module:
    for block in family.blocks:
        if hasattr(layer_module, block):
            return getattr(layer_module, block)
    raise RuntimeError(f"no MoE block among {family.blocks}")


def run_layer_by_layer(
    ckpt: Checkpoint,
    family: MoEFamily,
    input_ids: torch.Tensor,
    make_block: Callable[[int], Callable],
    *,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    max_activation_bytes: int = 4 * 1024**3,
    spill_dir: Path | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Push `input_ids` [n, seq] through every decoder layer; MoE blocks are computed by `make_block(layer)`.

    Returns the last layer's output hidden states (before the final norm). `on_batch(layer, tokens)` is
    called after each batch, for progress.
    """
    model = build_skeleton(ckpt, dtype)
    layers = model.model.layers
    originals = list(layers)
    last = len(originals) - 1
    batches = [input_ids[i : i + batch_size] for i in range(0, input_ids.shape[0], batch_size)]
    acts = ActivationStore((*input_ids.shape, family.hidden_size), dtype, max_activation_bytes, spill_dir)
    layer_kwargs: list[dict] = []
    with torch.no_grad():
        store: dict = {}
        for i in range(len(originals)):
            layers[i] = _Recorder(i, last, store, originals[i], family.layer_returns_tuple)
        row = 0
        for batch in batches:
            store.clear()
            try:
                model.model(input_ids=batch, use_cache=False)
            except _Stop:
                pass
            acts.data[row : row + len(batch)] = store["embeddings"]
            layer_kwargs.append({i: store[i] for i in range(len(originals))})
            row += len(batch)
        for i, module in enumerate(originals):
            layers[i] = module
        moe_layers = set(family.moe_layers())
        for i, module in enumerate(originals):
            moe = i in moe_layers
            module.load_state_dict(_layer_weights(ckpt, family, i, moe, dtype), strict=False, assign=True)
            if moe:
                _moe_module(module, family).forward = make_block(i)
            row = 0
            for b, batch in enumerate(batches):
                out = module(acts.data[row : row + len(batch)], **layer_kwargs[b][i])
                acts.data[row : row + len(batch)] = out[0] if isinstance(out, tuple) else out
                row += len(batch)
                if on_batch:
                    on_batch(i, batch.numel())
            module.to("meta")  # frees this layer's weights
            if moe:
                del _moe_module(module, family).forward
    return acts.data
