"""The options of convert, build, distill, export and sweep: one pydantic model per command, each default here once.

A config holds everything about a run but its model and output paths and the switches that do not change the result
(--force, --no-progress, --no-wait, --dry-run). Unknown fields are refused, so a typo in a `--config` file is one
clear error. The CLI takes its option defaults from these fields (tests/test_configs.py walks every option), and the
option of field `name` is `flag(name)`, --name with dashes. A refused value is a ConfigError naming the field; the
CLI names the flag instead (edgeconv.cli).

DistillConfig (the options of a distillation run, validated before any model is loaded): sizes are counted in
sequences and optimizer steps derived from the token budget: a step trains on `batch_size` packed sequences of
`seq_len` tokens (the global batch, whatever the number of processes), so the run has
ceil(tokens / (batch_size * seq_len)) steps and trains on exactly steps * batch_size * seq_len tokens (at least
`tokens`).
"""

from __future__ import annotations

import math
import string
import typing
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeconv.errors import EdgeconvError

CALIBRATION_TOKENS = 65536  # tokens of calibration text (calibrate, convert, build, sweep)
CALIBRATION_SEQ_LEN = 512  # tokens per calibration sequence
DEFAULT_DISTILL_TOKENS = 262_144  # build's distillation: about 3 minutes on the demo student on 2 CPU cores
# The peak distillation lr differs by command, on purpose: `distill` (and `convert --distill-tokens`, which takes
# "the other distillation options" from `edgeconv distill`) use DistillConfig's generic 5e-4; `build` distills the
# demo student on a short budget (262,144 tokens, 64 steps) and was tuned at 1e-3, and `sweep` follows `build` so
# its finalists are distilled as a build would (the committed study ran with 1e-3).
BUILD_DISTILL_LR = 1e-3

# Options that change how often work is saved, not what is computed: left out of the run key, so a run may be
# resumed with another --checkpoint-every.
NOT_IN_KEY = ("checkpoint_every", "keep_checkpoints")


def flag(field: str) -> str:
    """The CLI option of a config field: the one mapping between the two names."""
    return "--" + field.replace("_", "-")


class _Names(dict):
    def __init__(self, name):
        super().__init__()
        self.name = name

    def __missing__(self, key: str) -> str:
        return self.name(key)


class ConfigError(EdgeconvError):
    """A refused option, named by its config field.

    `problem` and `hint` write each field as ``{field}`` (and any other text through `literal`): the library's line
    names the field (``distill_lr``), the CLI's the flag (``--distill-lr``), through `render`. `fields` are the
    names used; `help` is set when the hint should point at the command's --help (a value pydantic refused).
    """

    def __init__(self, problem: str, hint: str = "", *, config: str | None = None, help: bool = False):
        self.template = (problem, hint)
        self.config = config
        self.help = help
        self.fields = [f for _, f, _, _ in string.Formatter().parse(problem + hint) if f]
        super().__init__(*self.render(str))

    def render(self, name) -> tuple[str, str]:
        """(problem, hint) with each field written as `name(field)`."""
        names = _Names(name)
        return self.template[0].format_map(names), self.template[1].format_map(names)


def literal(value) -> str:
    """`value` as text inside a ConfigError's problem or hint (its braces are not field names)."""
    return str(value).replace("{", "{{").replace("}", "}}")


class Options(BaseModel):
    """The base of the configs: frozen, unknown fields refused, refusals as ConfigError naming the field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def validated(cls, **options):
        """The config of these options, or a ConfigError naming the first field refused."""
        try:
            return cls(**options)
        except ValidationError as exc:
            first = exc.errors()[0]
            name = literal(first["loc"][0]) if first["loc"] else "options"
            reason = literal(first["msg"].lower())
            if first["type"] == "missing":
                problem = f"{{{name}}} is required"
            else:
                problem = f"{{{name}}} {literal(options.get(name, ''))}: {reason}"
            raise ConfigError(problem, f"see the fields of {cls.__name__}", config=cls.__name__, help=True) from None

    @classmethod
    def of(cls, config=None, options: dict | None = None):
        """`config` (or the defaults) with `options` replacing its fields, validated."""
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"config must be a {cls.__name__}, not {type(config).__name__}")
        if config is not None and not options:
            return config
        base = config.model_dump() if config is not None else {}
        return cls.validated(**{**base, **(options or {})})

    @classmethod
    def default(cls, field: str):
        """The default of `field` (the CLI's option default)."""
        return cls.model_fields[field].get_default(call_default_factory=True)

    @classmethod
    def choices(cls, field: str) -> tuple:
        """The values a Literal field takes (the CLI's click.Choice)."""
        annotation = cls.model_fields[field].annotation
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and typing.get_origin(args[0]) is Literal:
            args = list(typing.get_args(args[0]))
        return tuple(args)


class ConvertConfig(Options):
    """`edgeconv convert`: calibrate -> plan -> assemble [-> distill]; the paper's defaults."""

    data: Path | None = Field(None, description="calibration text; None: the shipped demo text")
    tokens: int = Field(CALIBRATION_TOKENS, gt=0, description="calibration tokens")
    seq_len: int = Field(CALIBRATION_SEQ_LEN, gt=0, description="tokens per calibration sequence")
    experts: int | None = Field(None, description="K experts kept per layer; None: the group count")
    groups: int | None = Field(None, description="groups per layer; None: the router's top-k")
    scoring: str = "do-acp"
    grouping: str = "none"
    scaling: str = "cp"
    seed: int = 0
    # 0: no distillation; any other value is DistillConfig's `tokens` (checked there, > 0).
    distill_tokens: int = Field(0, description="then distill on this many tokens (0: no distillation)")
    distill_data: Path | None = Field(None, description="distillation text; None: `data`")
    distill_mode: Literal["online", "offline"] = "online"
    distill_lr: float = Field(5e-4, gt=0, description="peak distillation lr (DistillConfig's; see BUILD_DISTILL_LR)")
    distill_lora_rank: int = Field(0, ge=0, description="DistillConfig's lora_rank (0: train every weight)")

    def distill_options(self) -> dict:
        """The DistillConfig options besides the budget (recorded in the run record as they are; LoRA only when
        asked for, so the records of earlier runs stay valid)."""
        return {"mode": self.distill_mode, "lr": self.distill_lr, **_lora(self.distill_lora_rank)}


def _lora(rank: int) -> dict:
    return {"lora_rank": rank} if rank else {}


class BuildConfig(Options):
    """`edgeconv build`: convert -> distill -> export -> parity -> bundle -> bench, for one target."""

    target: str = Field(description="device profile name, alias, or a .toml file (`edgeconv targets`)")
    format: Literal["gguf", "onnx-genai"] | None = Field(None, description="None: the target's first format")
    quant: str | None = Field(None, description="None: the target's")
    groups: int | None = Field(None, description="expert groups per layer; None: the router's top-k")
    context: int | None = Field(None, description="tokens of KV cache reserved; None: the target's")
    data: Path | None = Field(None, description="calibration text; None: the shipped demo text")
    calibration_tokens: int = Field(CALIBRATION_TOKENS, gt=0)
    distill_tokens: int = Field(DEFAULT_DISTILL_TOKENS, description="0: no distillation")
    distill_data: Path | None = Field(None, description="None: the shipped text for the demo teacher, else `data`")
    distill_lr: float = Field(BUILD_DISTILL_LR, gt=0)
    distill_mode: Literal["online", "offline"] = "online"
    distill_lora_rank: int = Field(0, ge=0, description="DistillConfig's lora_rank (0: train every weight)")
    eval_data: Path | None = Field(None, description="evaluation data bundled; None: the shipped held-out set")
    threads: int | None = Field(None, description="threads of the benchmark run here; None: all")
    bench: bool = Field(True, description="run bench.py here after bundling")
    measure: bool = Field(True, description="time one layer here for the plan's time estimates")

    def distill_options(self) -> dict:
        """The DistillConfig options besides the budget. Online, the default, is left out: a build records the
        options it had before the mode existed, so earlier builds stay up to date."""
        return {"lr": self.distill_lr, **({"mode": "offline"} if self.distill_mode == "offline" else {}),
                **_lora(self.distill_lora_rank)}


class ExportConfig(Options):
    """`edgeconv export`: a GGUF or ONNX artifact, checked against torch first."""

    format: Literal["gguf", "onnx", "onnx-genai"] = "gguf"
    quant: str | None = Field(None, description="None: the format's default (edgeconv.quant)")
    execution_provider: Literal["cpu", "cuda"] = Field("cpu", description="onnx-genai only")
    tokenizer_pre: str | None = Field(None, description="llama.cpp pre-tokenizer name, if it cannot be detected")
    imatrix_data: Path | None = Field(None, description="GGUF: calibration text for an importance matrix")
    imatrix_tokens: int = Field(8192, gt=0)
    device: str = Field("auto", description="where the torch reference of the parity check runs")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    layer_by_layer: bool | None = Field(None, description="the torch reference layer by layer; None: by memory")
    allow_yarn_drift: bool = Field(False, description="GGUF of a model whose YaRN has truncate=false (a GPT-OSS "
                                   "teacher): llama.cpp's truncated YaRN, the drift measured per position")
    parity_layers: int | None = Field(None, ge=0, description="GGUF: the parity check on the file cut to its first "
                                      "N layers (0: the whole file); None: the whole file when it fits in memory")


class SweepConfig(Options):
    """`edgeconv sweep`: the paper's study (scoring x grouping x scaling x K, then distillation of the best)."""

    data: Path | None = Field(None, description="calibration text; None: the shipped demo text")
    tokens: int = Field(CALIBRATION_TOKENS, gt=0, description="calibration tokens (one calibration for all)")
    scoring: str = Field("all", description="'all' or a comma list")
    grouping: str = Field("all", description="'all' or a comma list")
    scaling: str = Field("all", description="'all' or a comma list")
    k: str = Field("auto", description="comma list of K; auto: G, 2G, 4G, ... below the expert count")
    groups: int | None = None
    seed: int = 0
    eval_data: Path | None = None
    prescreen_examples: int = Field(0, description="skill examples per variant before distillation")
    prescreen_choices: int = Field(200, description="multiple-choice items per variant")
    jobs: int = Field(2, description="variants assembled and evaluated in parallel")
    threads: int | None = None
    distill_tokens: int = Field(0, description="0: prescreen only")
    top: int = 3
    distill_data: Path | None = None
    distill_lr: float = Field(BUILD_DISTILL_LR, gt=0, description="as build's")
    dense: str | None = Field(None, description="a dense model for the dense-to-dense baseline")
    results: Path | None = Field(None, description="also copy the tables, rows and plots here")
    keep: bool = False

    def distill_options(self) -> dict:
        return {"lr": self.distill_lr}

    def eval_options(self) -> dict:
        return {"examples": self.prescreen_examples, "choices": self.prescreen_choices}


class DistillConfig(Options):
    """`edgeconv distill` (and the distillation of convert, build and sweep): see the module's docstring."""

    tokens: int = Field(65536, gt=0, description="training tokens (the budget)")
    seq_len: int = Field(256, ge=2, description="tokens per packed sequence")
    batch_size: int = Field(16, ge=1, description="sequences per optimizer step, over all processes")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step (per process)")
    lr: float = Field(5e-4, gt=0, description="peak learning rate (AdamW)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the cosine decays to lr * min_lr_ratio")
    warmup: float = Field(0.05, ge=0, lt=1, description="linear warm-up, as a fraction of the steps")
    weight_decay: float = Field(0.0, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    temperature: float = Field(1.0, gt=0, description="softmax temperature of teacher and student in the KL")
    ce_weight: float = Field(0.0, ge=0, le=1, description="loss = (1 - w) * T^2 * KL + w * CE(data)")
    mode: Literal["online", "offline"] = "online"
    top_k: int = Field(64, ge=1, description="offline: teacher log-probs cached per token")
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    lora_rank: int = Field(0, ge=0, description="0: train every weight; R: freeze the student, train rank-R LoRA "
                                                "adapters (merged at the end): for students whose AdamW state does "
                                                "not fit in memory")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA scale numerator (adapter output x alpha / R); "
                                                             "default 2 x rank")
    gradient_checkpointing: bool = Field(False, description="keep each decoder layer's input only and recompute its "
                                                            "activations in the backward pass (one more forward)")

    @property
    def lora_alpha_value(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank

    @classmethod
    def make(cls, **options) -> DistillConfig:
        """Validate, turning the first problem into one line that names the `edgeconv distill` option (the pipelines'
        check of their distillation options; `validated` names the field instead)."""
        try:
            return cls(**options)
        except ValidationError as exc:
            first = exc.errors()[0]
            name = str(first["loc"][0]) if first["loc"] else "options"
            value = options.get(name, "")
            raise EdgeconvError(f"--{name.replace('_', '-')} {value}: {first['msg'].lower()}",
                                "see `edgeconv distill --help`") from None

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / self.tokens_per_step)

    @property
    def sequences(self) -> int:
        return self.steps * self.batch_size

    @property
    def trained_tokens(self) -> int:
        return self.sequences * self.seq_len

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup * self.steps)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak lr at optimizer step `step` (0-based): linear warm-up, then cosine decay."""
        warm = self.warmup_steps
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, self.steps - warm)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def key_options(self) -> dict:
        """What decides the result (everything but how often to checkpoint, and k when nothing is cached)."""
        skip = NOT_IN_KEY + (("top_k",) if self.mode == "online" else ())
        skip += ("lora_rank", "lora_alpha") if not self.lora_rank else ()  # keys of full-training runs unchanged
        skip += ("gradient_checkpointing",)  # the same gradients, recomputed: a run may resume with or without it
        return {k: v for k, v in self.model_dump().items() if k not in skip}
