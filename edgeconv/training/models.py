"""Teacher and student: are they a valid pair (checked from config.json and tokenizer files before any heavy
work), and loading them.

The student must be dense (a MoE would be trained as a MoE: pass the output of `edgeconv convert`), except an
`edgeconv upcycle` output, which is an MoE by design. The teacher
may be any causal LM that transformers loads, a MoE or not. Both must share the vocabulary: the same
`vocab_size` (the width of the logits compared token by token) and the same tokenizer (the same token -> id
map and the same ids for a probe text).
"""

from __future__ import annotations

import torch

from edgeconv.errors import EdgeconvError
from edgeconv.families.base import routed_experts
from edgeconv.io.checkpoint import Checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
PROBE = ("The quick brown fox jumps over the lazy dog. 12 + 34 = 46\n"
         "def f(x):\n    return x ** 2  # squares\nÀ bientôt, naïve café! 東京 🙂")


def check_pair(teacher: Checkpoint, student: Checkpoint) -> None:
    for role, ckpt in (("teacher", teacher), ("student", student)):
        arch = _arch(ckpt)
        if not arch.endswith("ForCausalLM"):
            raise EdgeconvError(f"the {role} {ckpt.path} is a {arch}, not a causal language model",
                                "distillation needs *ForCausalLM checkpoints")
    experts = routed_experts(student.config)
    if experts > 1 and not is_upcycled(student):
        raise EdgeconvError(
            f"the student {student.path} is a Mixture-of-Experts ({_arch(student)}, {experts} experts), not dense",
            "pass the dense model made from the teacher by `edgeconv convert` (or `edgeconv assemble`)",
        )
    tv, sv = _vocab(teacher), _vocab(student)
    if tv != sv:
        raise EdgeconvError(
            f"the teacher's vocabulary has {tv} tokens, the student's {sv}: their logits cannot be compared",
            "distill a student made from this teacher (same tokenizer and vocab_size)",
        )


def is_upcycled(ckpt: Checkpoint) -> bool:
    """An `edgeconv upcycle` output: an MoE on purpose, trained as one (its router included)."""
    import json

    manifest = ckpt.path / "manifest.json"
    return manifest.is_file() and json.loads(manifest.read_text()).get("stage") == "upcycle"


def has_tokenizer(ckpt: Checkpoint) -> bool:
    return any((ckpt.path / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(ckpt: Checkpoint, role: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ckpt.path)
    except Exception as exc:  # transformers raises many types for a missing or broken tokenizer
        raise EdgeconvError(f"cannot load the {role}'s tokenizer from {ckpt.path} ({type(exc).__name__})",
                            "put the tokenizer files (tokenizer.json, tokenizer_config.json) next to the weights")


def check_same_tokenizer(teacher_tok, student_tok, teacher: Checkpoint, student: Checkpoint) -> None:
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    other = sum(1 for token, i in tv.items() if sv.get(token) != i) + sum(1 for token in sv if token not in tv)
    probe_t = teacher_tok(PROBE, add_special_tokens=False)["input_ids"]
    probe_s = student_tok(PROBE, add_special_tokens=False)["input_ids"]
    if other or probe_t != probe_s or teacher_tok.eos_token_id != student_tok.eos_token_id:
        what = (f"{other} of {len(tv)} tokens map to other ids" if other else
                "a probe text encodes differently" if probe_t != probe_s else
                f"end-of-sequence ids {teacher_tok.eos_token_id} and {student_tok.eos_token_id}")
        raise EdgeconvError(
            f"the teacher ({teacher.path}) and student ({student.path}) tokenizers differ: {what}",
            "distill a student made from this teacher, which shares its tokenizer",
        )


def load_model(ckpt: Checkpoint, role: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=dtype)
    except Exception as exc:
        raise EdgeconvError(f"transformers cannot load the {role} {ckpt.path} ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:160] if str(exc) else ''})",
                            "pass a checkpoint that AutoModelForCausalLM.from_pretrained loads")
    return model.to(device)


def weights_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The dtype the student is stored in (its distilled weights are written back in it)."""
    names = [n for n in ckpt.names() if n.endswith(".weight")] or ckpt.names()
    dtype = ckpt.info(names[0]).dtype
    return dtype if dtype.is_floating_point else torch.float32


def _arch(ckpt: Checkpoint) -> str:
    return (ckpt.config.get("architectures") or [ckpt.config.get("model_type", "<unknown>")])[0]


def _vocab(ckpt: Checkpoint) -> int | None:
    return ckpt.config.get("vocab_size") or (ckpt.config.get("text_config") or {}).get("vocab_size")
