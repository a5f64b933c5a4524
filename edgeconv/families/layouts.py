"""How a checkpoint stores the experts of one MoE layer on disk, and how to read one expert back.

Each layout names its tensors relative to the layer prefix (``model.layers.3``). A family lists the
layouts it has shipped; the first one whose tensors are present in a layer is used for that layer, so a
checkpoint saved by transformers 4.x (one tensor per expert) and one saved by 5.x (fused 3-D tensors)
both read the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from edgeconv.families.ffn import Ffn
from edgeconv.io.checkpoint import Checkpoint


@dataclass(frozen=True)
class PerExpert:
    """One Linear per projection per expert: ``{block}.experts.{e}.{gate}.weight`` (transformers 4.x)."""

    block: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"

    def _name(self, prefix: str, e: int, proj: str) -> str:
        return f"{prefix}.{self.block}.experts.{e}.{proj}.weight"

    def matches(self, ckpt: Checkpoint, prefix: str) -> bool:
        return ckpt.has(self._name(prefix, 0, self.gate))

    def num_experts(self, ckpt: Checkpoint, prefix: str) -> int:
        pattern = re.compile(re.escape(f"{prefix}.{self.block}.experts.") + r"(\d+)\." + re.escape(self.gate)
                             + r"\.weight$")
        ids = {int(m.group(1)) for name in ckpt.names() if (m := pattern.match(name))}
        return max(ids) + 1 if ids else 0

    def width(self, ckpt: Checkpoint, prefix: str) -> int:
        return ckpt.info(self._name(prefix, 0, self.gate)).shape[0]

    def dtype(self, ckpt: Checkpoint, prefix: str) -> torch.dtype:
        return ckpt.info(self._name(prefix, 0, self.gate)).dtype

    def read(self, ckpt: Checkpoint, prefix: str, e: int) -> Ffn:
        return Ffn(*(ckpt.read(self._name(prefix, e, p)) for p in (self.gate, self.up, self.down)))


@dataclass(frozen=True)
class FusedGateUp:
    """transformers 5.x: ``experts.gate_up_proj`` [E, 2I, H] (gate rows, then up rows),
    ``experts.down_proj`` [E, H, I]."""

    block: str = "mlp"

    def _name(self, prefix: str, what: str) -> str:
        return f"{prefix}.{self.block}.experts.{what}"

    def matches(self, ckpt: Checkpoint, prefix: str) -> bool:
        return ckpt.has(self._name(prefix, "gate_up_proj")) and ckpt.has(self._name(prefix, "down_proj"))

    def num_experts(self, ckpt: Checkpoint, prefix: str) -> int:
        return ckpt.info(self._name(prefix, "gate_up_proj")).shape[0]

    def width(self, ckpt: Checkpoint, prefix: str) -> int:
        return ckpt.info(self._name(prefix, "gate_up_proj")).shape[1] // 2

    def dtype(self, ckpt: Checkpoint, prefix: str) -> torch.dtype:
        return ckpt.info(self._name(prefix, "gate_up_proj")).dtype

    def read(self, ckpt: Checkpoint, prefix: str, e: int) -> Ffn:
        gate_up = ckpt.read(self._name(prefix, "gate_up_proj"), e)
        gate, up = gate_up.chunk(2, dim=0)
        return Ffn(gate.contiguous(), up.contiguous(), ckpt.read(self._name(prefix, "down_proj"), e))


@dataclass(frozen=True)
class GptOssFused:
    """GPT-OSS in bf16: ``gate_up_proj`` [E, H, 2I] with gate and up interleaved along the last axis,
    ``down_proj`` [E, I, H] (both stored input-major, i.e. transposed against nn.Linear), plus biases."""

    block: str = "mlp"

    def _name(self, prefix: str, what: str) -> str:
        return f"{prefix}.{self.block}.experts.{what}"

    def matches(self, ckpt: Checkpoint, prefix: str) -> bool:
        return ckpt.has(self._name(prefix, "gate_up_proj"))

    def num_experts(self, ckpt: Checkpoint, prefix: str) -> int:
        return ckpt.info(self._name(prefix, "gate_up_proj_bias")).shape[0]

    def width(self, ckpt: Checkpoint, prefix: str) -> int:
        return ckpt.info(self._name(prefix, "gate_up_proj_bias")).shape[1] // 2

    def dtype(self, ckpt: Checkpoint, prefix: str) -> torch.dtype:
        return ckpt.info(self._name(prefix, "gate_up_proj")).dtype

    def _weights(self, ckpt: Checkpoint, prefix: str, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        return ckpt.read(self._name(prefix, "gate_up_proj"), e), ckpt.read(self._name(prefix, "down_proj"), e)

    def read(self, ckpt: Checkpoint, prefix: str, e: int) -> Ffn:
        gate_up, down = self._weights(ckpt, prefix, e)  # [H, 2I], [I, H]
        gate_up_bias = ckpt.read(self._name(prefix, "gate_up_proj_bias"), e)
        return Ffn(
            gate_up[:, 0::2].t().contiguous(),
            gate_up[:, 1::2].t().contiguous(),
            down.t().contiguous(),
            gate_up_bias[0::2].contiguous(),
            gate_up_bias[1::2].contiguous(),
            ckpt.read(self._name(prefix, "down_proj_bias"), e),
        )


# MXFP4 (OCP microscaling): 4-bit e2m1 codes, two per byte (low nibble first), one shared power-of-two
# scale (biased by 127) per block of 32 values along the input axis.
FP4_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """[rows, groups, 16] uint8 codes and [rows, groups] uint8 exponents -> [rows, groups * 32] values."""
    rows, groups, nbytes = blocks.shape
    values = torch.empty(rows, groups, nbytes * 2, dtype=torch.float32)
    values[..., 0::2] = FP4_E2M1[(blocks & 0x0F).long()]
    values[..., 1::2] = FP4_E2M1[(blocks >> 4).long()]
    values = torch.ldexp(values, scales.to(torch.int32).unsqueeze(-1) - 127)
    return values.reshape(rows, groups * nbytes * 2).to(dtype)


@dataclass(frozen=True)
class GptOssMxfp4(GptOssFused):
    """GPT-OSS as OpenAI released it: expert weights in MXFP4 (``*_blocks`` + ``*_scales``), biases in bf16.
    Blocks are stored output-major ([E, 2I, H/32, 16]); dequantized and transposed to the bf16 layout."""

    def matches(self, ckpt: Checkpoint, prefix: str) -> bool:
        return ckpt.has(self._name(prefix, "gate_up_proj_blocks"))

    def dtype(self, ckpt: Checkpoint, prefix: str) -> torch.dtype:
        return ckpt.info(self._name(prefix, "gate_up_proj_bias")).dtype

    def _weights(self, ckpt: Checkpoint, prefix: str, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.dtype(ckpt, prefix)

        def load(what: str) -> torch.Tensor:
            blocks = ckpt.read(self._name(prefix, f"{what}_blocks"), e)
            scales = ckpt.read(self._name(prefix, f"{what}_scales"), e)
            return dequantize_mxfp4(blocks, scales, dtype).t()

        return load("gate_up_proj"), load("down_proj")


@dataclass(frozen=True)
class PlainMlp:
    """A single SwiGLU MLP stored as three Linears: a dense layer, or a shared expert."""

    block: str = "mlp"

    def _name(self, prefix: str, proj: str) -> str:
        return f"{prefix}.{self.block}.{proj}.weight"

    def matches(self, ckpt: Checkpoint, prefix: str) -> bool:
        return ckpt.has(self._name(prefix, "gate_proj"))

    def width(self, ckpt: Checkpoint, prefix: str) -> int:
        return ckpt.info(self._name(prefix, "gate_proj")).shape[0]

    def read(self, ckpt: Checkpoint, prefix: str) -> Ffn:
        return Ffn(*(ckpt.read(self._name(prefix, p)) for p in ("gate_proj", "up_proj", "down_proj")))
