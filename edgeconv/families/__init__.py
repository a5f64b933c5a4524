"""One adapter per MoE family, registered by its Hugging Face architecture name."""

from edgeconv.families import deepseek_v2, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe  # noqa: F401  (registers)
from edgeconv.families.base import FAMILIES, MoEFamily, family_for

__all__ = ["FAMILIES", "MoEFamily", "family_for"]
