"""What every MoE family adapter is: mostly a table of names, plus the few lines that are truly special.

An adapter is bound to one checkpoint's config. It reads the router, the experts and the shared expert of
one layer straight from the safetensors files (never building the model), writes the dense config, and
names the dense FFN tensors. Every tensor it does not own (attention, norms, embeddings, head) is copied
unchanged by the assembler.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from edgeconv.errors import EdgeconvError
from edgeconv.families.ffn import Ffn
from edgeconv.families.layouts import FusedGateUp, PerExpert, PlainMlp
from edgeconv.io.checkpoint import Checkpoint
from edgeconv.registry import Registry


class MoEFamily:
    moe_architecture: ClassVar[str]
    dense_architecture: ClassVar[str]
    dense_model_type: ClassVar[str]
    # On-disk expert layouts this family has shipped, tried in order per layer.
    layouts: ClassVar[tuple] = (PerExpert(), FusedGateUp())
    # Module names (under the layer prefix) whose tensors belong to the FFN block and are rewritten.
    blocks: ClassVar[tuple[str, ...]] = ("mlp",)
    router_names: ClassVar[tuple[str, ...]] = ("mlp.gate",)
    shared: ClassVar[PlainMlp | None] = None
    num_experts_key: ClassVar[str] = "num_experts"
    top_k_key: ClassVar[str] = "num_experts_per_tok"
    expert_width_key: ClassVar[str] = "moe_intermediate_size"
    # MoE-only config keys that the dense config drops.
    moe_config_keys: ClassVar[tuple[str, ...]] = ()
    has_ffn_bias: ClassVar[bool] = False  # GPT-OSS experts carry biases
    # How transformers 4.57's modules hand results on (used when calibration runs the decoder layers).
    block_returns_tuple: ClassVar[bool] = True  # the MoE block returns (hidden, router_logits)
    layer_returns_tuple: ClassVar[bool] = False  # the decoder layer returns (hidden, ...)

    def __init__(self, config: dict):
        self.config = config

    # --- shape of the model --------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def num_experts(self) -> int:
        return int(self.config.get(self.num_experts_key) or 0)

    @property
    def top_k(self) -> int:
        return int(self.config[self.top_k_key])

    @property
    def expert_width(self) -> int:
        return int(self.config[self.expert_width_key])

    @property
    def dense_layer_width(self) -> int:
        """Width of the layers that are dense in the source itself (0 if there are none)."""
        return int(self.config.get("intermediate_size") or 0)

    def is_moe_layer(self, layer: int) -> bool:
        return True

    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    @property
    def shared_width(self) -> int:
        return 0

    def routed_scale(self) -> float:
        """A constant the router multiplies every routed expert's weight by (DeepSeek's routed_scaling_factor)."""
        return 1.0

    def default_shared_scale(self) -> float:
        """Constant the shared expert's output is multiplied by in the dense model, absent calibration."""
        return 1.0

    # --- computing (calibration runs the MoE block with these, from the weights read from files) -------
    def normalizes_top_k(self) -> bool:
        return bool(self.config.get("norm_topk_prob", False))

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights [T, k] (before routed_scale) and expert ids [T, k] from router logits [T, E]."""
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.normalizes_top_k():
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def ffn_forward(self, ffn: Ffn, x: torch.Tensor) -> torch.Tensor:
        """One expert (or dense MLP) applied to tokens x [T, hidden]: down(silu(gate x) * up x)."""
        return torch.nn.functional.linear(
            torch.nn.functional.silu(torch.nn.functional.linear(x, ffn.gate)) * torch.nn.functional.linear(x, ffn.up),
            ffn.down,
        )

    def read_shared_gate(self, ckpt: Checkpoint, layer: int) -> torch.Tensor | None:
        """Weight [1, hidden] of a per-token sigmoid gate on the shared expert, if the family has one."""
        return None

    # --- reading --------------------------------------------------------------------------------------
    @staticmethod
    def prefix(layer: int) -> str:
        return f"model.layers.{layer}"

    def layout(self, ckpt: Checkpoint, layer: int):
        for layout in self.layouts:
            if layout.matches(ckpt, self.prefix(layer)):
                return layout
        raise EdgeconvError(
            f"layer {layer} of {ckpt.path} has no expert tensors in any {self.moe_architecture} layout "
            f"({', '.join(type(layout).__name__ for layout in self.layouts)})",
            "the checkpoint is incomplete or was saved by an unsupported tool",
        )

    def read_expert(self, ckpt: Checkpoint, layer: int, expert: int) -> Ffn:
        return self.layout(ckpt, layer).read(ckpt, self.prefix(layer), expert)

    def read_router(self, ckpt: Checkpoint, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Router weight [E, hidden] and bias [E] (or None)."""
        for name in self.router_names:
            full = f"{self.prefix(layer)}.{name}"
            if ckpt.has(f"{full}.weight"):
                bias = ckpt.read(f"{full}.bias") if ckpt.has(f"{full}.bias") else None
                return ckpt.read(f"{full}.weight"), bias
        raise EdgeconvError(f"layer {layer} of {ckpt.path} has no router", "the checkpoint is incomplete")

    def read_shared(self, ckpt: Checkpoint, layer: int) -> Ffn | None:
        return self.shared.read(ckpt, self.prefix(layer)) if self.shared else None

    def read_dense_mlp(self, ckpt: Checkpoint, layer: int) -> Ffn:
        return PlainMlp().read(ckpt, self.prefix(layer))

    def owns(self, name: str, layer: int) -> bool:
        """True if tensor `name` belongs to the FFN block of `layer` (and is rewritten, not copied)."""
        return any(name.startswith(f"{self.prefix(layer)}.{block}.") for block in self.blocks)

    def check_checkpoint(self, ckpt: Checkpoint) -> None:
        """Fail before any work if a MoE layer's experts do not match the config."""
        for layer in self.moe_layers():
            layout = self.layout(ckpt, layer)
            found = layout.num_experts(ckpt, self.prefix(layer))
            if found != self.num_experts:
                raise EdgeconvError(
                    f"layer {layer} of {ckpt.path} holds {found} experts but config.json says {self.num_experts}",
                    "the checkpoint and its config do not belong together",
                )

    # --- writing --------------------------------------------------------------------------------------
    def dense_config(self, width: int) -> dict:
        dense = {k: v for k, v in self.config.items() if k not in self.moe_config_keys}
        dense.pop("quantization_config", None)  # the dense weights are written unquantized
        dense.pop("auto_map", None)
        dense["architectures"] = [self.dense_architecture]
        dense["model_type"] = self.dense_model_type
        dense["intermediate_size"] = width
        return dense

    def dense_ffn_tensors(self, layer: int, ffn: Ffn) -> dict[str, torch.Tensor]:
        p = f"{self.prefix(layer)}.mlp"
        return {f"{p}.gate_proj.weight": ffn.gate, f"{p}.up_proj.weight": ffn.up, f"{p}.down_proj.weight": ffn.down}

    def zero_tensors(self, ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
        """Tensors the dense class needs that the MoE checkpoint lacks, written as zeros: name -> shape."""
        return {}

    # --- counting -------------------------------------------------------------------------------------
    def expert_params(self, ckpt: Checkpoint) -> int:
        """Parameters of one routed expert (read from the headers of the first MoE layer)."""
        layer = self.moe_layers()[0]
        layout = self.layout(ckpt, layer)
        prefix = self.prefix(layer)
        width, hidden = layout.width(ckpt, prefix), self.hidden_size
        params = 3 * width * hidden
        if self.has_ffn_bias:
            params += 2 * width + hidden
        return params


FAMILIES: Registry[type[MoEFamily]] = Registry("MoE family")

# Dense architectures people may pass by mistake, to tell them apart from unknown ones.
KNOWN_DENSE = {
    "Qwen3ForCausalLM",
    "Qwen2ForCausalLM",
    "MistralForCausalLM",
    "LlamaForCausalLM",
    "OlmoForCausalLM",
    "Olmo2ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
}


def register(cls: type[MoEFamily]) -> type[MoEFamily]:
    return FAMILIES.register(cls.moe_architecture)(cls)


def family_for(config: dict, where: str = "the model") -> MoEFamily:
    """The adapter for a checkpoint's config, or a clear error for dense and unsupported models."""
    archs = config.get("architectures") or []
    arch = archs[0] if archs else config.get("model_type", "<none>")
    if arch not in FAMILIES:
        if arch in KNOWN_DENSE or not looks_moe(config):
            raise EdgeconvError(
                f"{where} is a dense model ({arch}), not a Mixture-of-Experts",
                f"pass the MoE teacher; supported MoE architectures: {', '.join(FAMILIES.names())}",
            )
        raise EdgeconvError(
            f"architecture {arch} of {where} is not supported",
            f"supported MoE architectures: {', '.join(FAMILIES.names())}",
        )
    family = FAMILIES.get(arch)(config)
    if family.num_experts <= 1:
        raise EdgeconvError(
            f"{where} is a dense model ({arch} with {family.num_experts} expert), not a Mixture-of-Experts",
            "pass the MoE teacher, not an edgeconv output",
        )
    return family


def routed_experts(config: dict) -> int:
    """How many experts the model's MoE layers route among; 1 for a dense model, including edgeconv's
    single-expert outputs (OLMoE, GPT-OSS) and a DeepSeek-V2 whose every layer is dense. An architecture
    without an adapter (e.g. the GLM-4-MoE container of `edgeconv upcycle`) is read from its config keys."""
    arch = (config.get("architectures") or [""])[0]
    if arch not in FAMILIES:
        return _config_experts(config)
    family = FAMILIES.get(arch)(config)
    return family.num_experts if family.moe_layers() else 1


def _config_experts(config: dict) -> int:
    keys = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
    return max([1] + [int(config.get(k) or 0) for k in keys])


def looks_moe(config: dict) -> bool:
    return _config_experts(config) > 1

