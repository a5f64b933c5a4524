"""What `edgeconv build` needs on the machine that runs it: memory per stage, disk, rough time; refused before work.

The target check (edgeconv.device.memory_fit) asks whether the *student* fits the *device*. This asks whether the
*build* fits *this host*, from config.json alone (shapes on torch's meta device, no weights read):

- memory, per stage, where it runs: calibrate, the cache pass, distill and the parity reference on the GPU when
  there is one (their `auto` device; bf16 there, fp32 on the CPU), assemble, the GGUF files and bench on the CPU;
  each stage adds 0.5 GB for the process itself (python, torch, transformers, a tokenizer):
  calibrate  layer by layer: the embeddings + the largest decoder layer in the compute dtype (on a GPU also the
             next one, read ahead as stored) + the calibration activations (tokens x hidden, in memory up to
             4 GiB, spilled to disk beyond) + one batch's working set (eager attention scores included)
  assemble   about one layer: the selected experts in fp32 while merged, the largest output tensor
  cache      offline distillation's first pass: the whole teacher when it fits, else layer by layer (embeddings,
             head, two layers, 2 GiB of activations a pass), chosen with edgeconv.forward's own rule
  distill    the student's weights, gradients and AdamW moments in fp32 (16 bytes per parameter; with LoRA the
             student frozen, 4 bytes, and 16 per adapter parameter) + the
             activations kept for the backward pass (6 hidden + 6 query + 4 key/value + 4 FFN values per token
             and layer) + 9 (online) or 7 (offline) fp32 copies of a micro-batch's logits; online also the whole
             teacher
  export     the parity reference in fp32: the student whole when it fits, else layer by layer (same rule)
  bench      bench.py in its own process: the target estimate itself
  Against the peak RSS measured here (benchmarks/results): the demo's distillation 1.84 GB planned / 2.08 GB
  measured online, 1.61 / 1.91 offline, its cache pass 0.81 / 0.99; calibrating an 8-layer random Qwen3-MoE
  0.79 / 0.79 (a test holds them within 25 %).
- disk, on the filesystem of each directory written, at the build's peak (what is removed when a stage
  ends is not counted after it): the activation spill, the assembled and the distilled student (in the
  teacher's dtype), distillation checkpoints (fp32 weights + AdamW moments: 12 bytes per parameter, up to
  keep + 1 of them), the offline teacher cache (k x (2 + index bytes) + 4 bytes per token), the float GGUF
  intermediate + the quantized one, the bundle's copy. What OUT and OUT.work already hold counts as room.
- time, rough: one decoder layer of the student's shape (the teacher's attention with its *active* FFN
  width) runs forward on random inputs for about two seconds here; every stage that computes is priced in
  parameter x tokens at that rate (training at 3x forward), disk-bound stages at an assumed 500 MB/s.

Anything that cannot fit is an EdgeconvError naming the numbers and the option that fixes it. A model
directory holding only config.json cannot be built here anyway: its plan marks what would not fit and
refuses nothing.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgeconv.device.memory_fit import gb, tensor_shapes, weight_bytes
from edgeconv.errors import EdgeconvError

ADAMW_BYTES_PER_PARAM = 16  # fp32 weights, gradients and the two AdamW moments
CHECKPOINT_BYTES_PER_PARAM = 12  # a distill checkpoint: fp32 weights + the two moments
DISK_BYTES_PER_S = 500e6  # assumed sequential disk throughput (not measured: a dry run writes nothing)
MAX_ACTIVATION_BYTES = 4 * 1024**3  # calibrate's --max-activation-memory default
CALIBRATION_SEQ_LEN, CALIBRATION_BATCH, GRAM_TOKENS = 512, 4, 1024  # what `build` calibrates with
BENCH_TOKENS = 25_000  # bench.py --quick: speed prompts, 2,048 tokens per corpus, skills, choices (about)
MEASURE_SECONDS = 2.0
PROCESS_BYTES = 500_000_000  # python + torch + transformers + a tokenizer (RSS before any model, measured here)
# fp32 [micro-batch, vocabulary] tensors alive at once: online, the KL's teacher and student log-softmax, exp,
# difference and product, the CE's log-softmax and the gradients; offline the teacher side is k wide; the cache
# pass keeps the logits, their log-softmax and the masked copy for the tail.
LOGITS_COPIES = {"online": 9, "offline": 7, "cache": 3}
WEIGHT_FILES = re.compile(r".*\.(safetensors|bin|pt|pth)$")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


# ---- the host ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Host:
    cpu: str
    cores: int
    ram_total: int
    ram_available: int
    gpu: str | None = None
    gpu_memory: int = 0

    @classmethod
    def detect(cls) -> Host:
        import torch

        total, available = _ram()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        gpu, gpu_memory = None, 0
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            gpu, gpu_memory = props.name, int(props.total_memory)
        return cls(_cpu_name(), cores, total, available, gpu, gpu_memory)

    @property
    def accelerator(self) -> str:
        """Where calibrate, the cache pass, distill and the parity reference run (their `auto` device)."""
        return "cuda" if self.gpu else "cpu"

    def memory_of(self, device: str) -> int:
        return self.gpu_memory if device == "cuda" else self.ram_total

    def available(self, device: str) -> int:
        return self.gpu_memory if device == "cuda" else self.ram_available

    def line(self) -> str:
        gpu = f"GPU {self.gpu} ({gb(self.gpu_memory)})" if self.gpu else "no GPU"
        return (f"{self.cpu}, {self.cores} cores; RAM {gb(self.ram_total)} ({gb(self.ram_available)} available); "
                f"{gpu}")


def _ram() -> tuple[int, int]:
    """Total and available RAM in bytes: psutil when installed (a dev dependency), else /proc/meminfo, else sysconf."""
    try:
        import psutil

        mem = psutil.virtual_memory()
        return int(mem.total), int(mem.available)
    except ImportError:
        pass
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        total = int(info["MemTotal"].split()[0]) * 1024
        return total, int(info.get("MemAvailable", info["MemTotal"]).split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total, total


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


# ---- the teacher's shape -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TeacherShape:
    params: int
    active_params: int  # per token: everything but the unrouted experts
    largest_layer: int  # parameters of the largest decoder layer (all its experts)
    expert_params: int  # one routed expert, summed over the MoE layers (router row included)
    embed_params: int
    vocab: int
    hidden: int
    tied: bool
    dtype: str  # of the weights: config.json's torch_dtype
    file_bytes: int | None  # the weight files on disk; None when the directory holds config.json only
    files: int = 0

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 2)

    @property
    def bytes(self) -> int:
        return self.file_bytes if self.file_bytes is not None else self.params * self.dtype_bytes

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def compute_params(self) -> int:
        """Parameters multiplied per token in a full forward (the embedding is a lookup, the head a matmul)."""
        return self.active_params - self.embed_params + (self.head_params if self.tied else 0)


def config_dtype(config: dict) -> str:
    return str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")


def teacher_shape(config: dict, family, path: Path | None = None) -> TeacherShape:
    """Parameter counts of the MoE from two cheap meta instantiations (1 and 2 experts per layer): every count
    is linear in the number of experts, so Qwen3-30B-A3B's 6,144 experts cost no more than 2 per layer."""
    k_e, k_k = family.num_experts_key, family.top_k_key
    one = tensor_shapes({**config, k_e: 1, k_k: 1})
    two = tensor_shapes({**config, k_e: 2, k_k: 1})
    experts, top_k = family.num_experts, family.top_k

    def extrapolate(a: int, b: int, n: int) -> int:
        return a + (n - 1) * (b - a)

    p1, p2 = _count(one), _count(two)
    layers1, layers2 = _by_layer(one), _by_layer(two)
    largest = max((extrapolate(layers1[i], layers2.get(i, 0), experts) for i in layers1), default=0)
    embed = next((math.prod(s) for n, s in one.items() if n.endswith("embed_tokens.weight")), 0)
    file_bytes, files = None, 0
    if path is not None:
        weights = [p for p in Path(path).iterdir() if p.is_file() and WEIGHT_FILES.match(p.name)]
        if weights:
            file_bytes, files = sum(p.stat().st_size for p in weights), len(weights)
    return TeacherShape(params=extrapolate(p1, p2, experts), active_params=extrapolate(p1, p2, top_k),
                        largest_layer=largest, expert_params=p2 - p1, embed_params=embed,
                        vocab=int(config["vocab_size"]), hidden=int(config["hidden_size"]),
                        tied="lm_head.weight" not in one, dtype=config_dtype(config), file_bytes=file_bytes,
                        files=files)


def _count(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values())


LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _by_layer(shapes: dict[str, tuple[int, ...]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for name, shape in shapes.items():
        m = LAYER.search(name)
        if m:
            out[int(m.group(1))] = out.get(int(m.group(1)), 0) + math.prod(shape)
    return out


def _attention_widths(config: dict) -> tuple[int, int]:
    """Query and key/value widths of one attention layer (all heads)."""
    heads = int(config.get("num_attention_heads") or 1)
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    kv = int(config.get("num_key_value_heads") or heads)
    return heads * head_dim, kv * head_dim


def cache_bytes_per_token(top_k: int, vocab: int) -> int:
    """The offline teacher cache's bytes per token, from the cache's own spec (fp16 log-probs, uint16 or int32
    ids, an fp32 tail): 388 at k = 64 with a 151,936-token vocabulary, 260 with 65,536 tokens or fewer."""
    from edgeconv.training.teacher_cache import CacheSpec

    return CacheSpec("", "", 0, 0, top_k, 1.0, vocab).bytes_per_token


# ---- measured throughput -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Throughput:
    device: str
    dtype: str
    layer_params: int  # the matmul parameters of the measured layer
    tokens_per_s: float  # through that one layer, forward
    seconds: float  # spent measuring
    load: float | None = None  # the 1-minute load average when measured

    @property
    def param_tokens_per_s(self) -> float:
        return self.layer_params * self.tokens_per_s

    def line(self) -> str:
        load = f", load average {self.load:.1f}" if self.load is not None and self.device == "cpu" else ""
        return (f"{self.tokens_per_s:,.0f} tokens/s through one {self.layer_params / 1e6:,.1f} M-parameter layer "
                f"on {self.device} ({self.dtype}, measured {self.seconds:.1f} s{load})")


_MEASURED: dict[tuple, Throughput] = {}  # per (host, device, layer shape), this process only


def measure(dense_config: dict, device: str = "cpu", seconds: float = MEASURE_SECONDS) -> Throughput:
    """Forward passes of one decoder layer of `dense_config`'s shape, random weights, for about `seconds`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    one = {**dense_config, "num_hidden_layers": 1, "vocab_size": 128, "tie_word_embeddings": False}
    if isinstance(one.get("layer_types"), list):
        one["layer_types"] = one["layer_types"][:1]
    for key in ("first_k_dense_replace",):  # every layer of the dense student is dense
        if key in one:
            one[key] = 1
    key = (platform.node(), device, json.dumps(one, sort_keys=True, default=str))
    if key in _MEASURED:
        return _MEASURED[key]
    skip = ("architectures", "transformers_version", "model_type", "auto_map", "quantization_config", "torch_dtype",
            "dtype")
    cfg = AutoConfig.for_model(one["model_type"], **{k: v for k, v in one.items() if k not in skip})
    started = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    layer = model.model.layers[0]
    params = sum(p.numel() for p in layer.parameters() if p.dim() >= 2)
    # About 2e10 parameter x tokens a pass (40 GFLOP), at most a distillation micro-batch (16 x 256 tokens):
    # long enough to time, short enough for a 7 B student's layer.
    tokens = max(64, min(4096, int(2e10 // max(params, 1))))
    seq = min(256, tokens, int(one.get("max_position_embeddings") or 256))
    batch = max(1, tokens // seq)
    x = torch.randn(batch, seq, cfg.hidden_size, device=device, dtype=dtype) * 0.02
    positions = torch.arange(seq, device=device).unsqueeze(0).expand(batch, -1)
    with torch.no_grad():
        rope = model.model.rotary_emb(x, positions) if hasattr(model.model, "rotary_emb") else None

    def run_layer() -> None:  # the layer alone: no mask building, no embedding, as in a deep model
        layer(x, attention_mask=None, position_ids=positions, position_embeddings=rope)

    def run_model() -> None:
        model.model(inputs_embeds=x, use_cache=False)

    forward = run_layer
    try:
        with torch.no_grad():
            run_layer()
    except Exception:  # a family whose layer wants other arguments: time the one-layer model instead
        forward = run_model

    def step() -> float:
        t0 = time.perf_counter()
        forward()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    with torch.no_grad():
        warm = time.perf_counter()
        while True:  # warm-up: kernels chosen, memory allocated
            first = step()
            if time.perf_counter() - warm > min(0.3, seconds / 4) or first > seconds / 4:
                break
        times: list[float] = []
        while sum(times) < seconds and not (times and first > seconds / 4 and len(times) >= 2):
            times.append(step())
    model = x = None  # frees them (the closures above hold these cells)
    # The first quartile of the passes: a neighbour's bursts only slow some of them (2 vCPUs here vary 3x).
    elapsed = sorted(times)[len(times) // 4]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = Throughput(device, str(dtype).removeprefix("torch."), params, batch * seq / elapsed,
                        time.perf_counter() - started, load)
    _MEASURED[key] = result
    return result


# ---- the plan ----------------------------------------------------------------------------------------------
@dataclass
class Item:
    """Something a stage writes to disk; it stays until the build ends unless `until` (a stage name) removes it."""

    name: str
    bytes: int
    where: Path
    until: str | None = None


@dataclass
class HostStage:
    name: str
    device: str
    memory: int
    memory_how: str
    seconds: float | None
    writes: list[Item] = field(default_factory=list)
    note: str = ""


@dataclass
class DiskNeed:
    where: Path  # the directory whose filesystem it is
    peak: int  # bytes needed at the build's peak on that filesystem
    peak_stage: str
    items: list[Item]  # live at the peak, largest first
    present: int  # bytes already in OUT and OUT.work on it (a rerun reuses or replaces them)
    free: int

    @property
    def needed(self) -> int:
        return max(0, self.peak - self.present)

    @property
    def fits(self) -> bool:
        return self.needed <= self.free


@dataclass
class HostPlan:
    host: Host
    teacher: TeacherShape
    student_params: int
    stages: list[HostStage]
    disks: list[DiskNeed]
    rates: dict[str, Throughput | None]
    measure_note: str
    config_only: bool
    problems: list[EdgeconvError]
    distill: dict = field(default_factory=dict)  # mode, trained tokens, cache bytes per token

    def stage(self, name: str) -> HostStage | None:
        return next((s for s in self.stages if s.name == name), None)

    def lines(self) -> list[str]:
        t, h = self.teacher, self.host
        where = (f"{gb(t.file_bytes)} in {t.files} weight file{'s' if t.files != 1 else ''}" if t.file_bytes is not None
                 else f"{gb(t.bytes)} in {t.dtype} (config.json only: no weights here)")
        lines = [
            "  host",
            f"    machine     {h.line()}",
            f"    teacher     {count(t.params)} parameters ({count(t.active_params)} active per token), {where}",
            f"    throughput  {self.measure_note}",
        ]
        d = self.distill
        if d.get("mode") == "offline":
            lines.append(f"    cache       {d['bytes_per_token']} B/token (top-{d['top_k']}, {t.vocab:,}-token "
                         f"vocabulary) x {d['tokens']:,} tokens = {gb(d['bytes_per_token'] * d['tokens'])}")
        lines.append(f"    {'stage':<10}  {'on':<4}  {'peak memory':>11}  {'time (rough)':>12}  disk written")
        total = 0.0
        for s in self.stages:
            limit = self.host.memory_of(s.device)
            mark = "" if s.memory <= limit else f"  DOES NOT FIT {gb(limit)}"
            if s.device == "cpu" and s.memory <= limit and s.memory > self.host.ram_available:
                mark = f"  tight: {gb(self.host.ram_available)} available now"
            written = ", ".join(f"{i.name} {gb(i.bytes)}" + (f" (gone after {i.until})" if i.until else "")
                                for i in s.writes if i.bytes) or "-"
            total += s.seconds or 0.0
            lines.append(f"    {s.name:<10}  {s.device:<4}  {gb(s.memory):>11}  {duration(s.seconds):>12}  {written}"
                         f"{mark}")
            lines.append(f"    {'':<10}  {'':<4}  {s.memory_how}" + (f"; {s.note}" if s.note else ""))
        for disk in self.disks:
            fit = "fits" if disk.fits else "DOES NOT FIT"
            already = f" ({gb(disk.present)} of it already there)" if disk.present else ""
            lines.append(f"    disk        {gb(disk.peak)} at the peak ({disk.peak_stage}){already}, "
                         f"{gb(disk.free)} free at {disk.where}: {fit}")
        if all(s.seconds is not None for s in self.stages):
            lines.append(f"    total       {duration(total)} (rough: the measured layer throughput, an assumed "
                         "500 MB/s disk)")
        else:
            lines.append("    total       time not estimated (no throughput measured)")
        if self.problems:
            lead = ("config.json only, so nothing would run here anyway; a build with the weights would stop: "
                    if self.config_only else "refused: ")
            lines.append(f"    {lead}{self.problems[0].line()}")
        return lines

    def check(self) -> None:
        """Raise the first problem, unless the plan is for a directory with no weights (a sizing exercise)."""
        if self.problems and not self.config_only:
            raise self.problems[0]


def _dtype(nbytes: int) -> str:
    return "bf16" if nbytes == 2 else "fp32"


def _slowest(*seconds: float | None) -> float | None:
    """Compute and reading overlap (the next layer is read while one computes): the slower one sets the pace."""
    return None if seconds[0] is None else max(seconds)


def count(n: int) -> str:
    return f"{n / 1e9:,.2f} B" if n >= 1e9 else f"{n / 1e6:,.1f} M"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 1:
        return "<1 s"
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 5400:
        return f"~{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"~{seconds / 3600:.1f} h"
    return f"~{seconds / 86400:.1f} days"


@dataclass
class _Build:
    """What every stage's estimate reads: the host, the teacher and student shapes, the measured rates."""
    host: Host
    t: TeacherShape
    family: object
    config: dict
    dense: dict
    student_params: int
    student_shapes: dict
    work: Path
    rates: dict[str, Throughput | None]

    @property
    def dev(self) -> str:
        return self.host.accelerator

    @property
    def cb(self) -> int:  # the compute dtype's bytes: bf16 on a GPU, fp32 on the CPU
        return 2 if self.dev == "cuda" else 4

    @property
    def sb(self) -> int:  # as stored
        return self.t.dtype_bytes

    @property
    def student_bytes(self) -> int:
        return self.student_params * self.t.dtype_bytes

    @property
    def student_layers(self) -> dict[int, int]:
        return _by_layer(self.student_shapes)

    @property
    def student_compute(self) -> int:
        """The student's parameters multiplied per token (the embedding is a lookup, a tied head a matmul)."""
        untied_head = "lm_head.weight" in self.student_shapes
        return self.student_params - self.t.embed_params + (0 if untied_head else self.t.head_params)

    @property
    def student_work(self) -> Path:  # convert's own work directory (build converts into OUT.work/student)
        return self.work / "student.work"

    def compute_time(self, param_tokens: float, device: str) -> float | None:
        r = self.rates.get(device)
        return param_tokens / r.param_tokens_per_s if r else None

    def whole_fits(self, weights: int, allowance: int, device: str) -> bool:
        """Whole model or layer by layer: edgeconv.forward's own rule (calibration, the cache pass, parity)."""
        from edgeconv.forward.layer_by_layer import SAFETY

        return weights + allowance <= SAFETY * self.host.available(device)


def _disk_time(nbytes: float) -> float:
    return nbytes / DISK_BYTES_PER_S


def _measure_rates(dense: dict, dev: str, measure_throughput: bool) -> tuple[dict[str, Throughput | None], str]:
    rates: dict[str, Throughput | None] = {"cpu": None, "cuda": None}
    if not measure_throughput:
        return rates, "not measured (--no-measure): no time estimates"
    try:
        rates["cpu"] = measure(dense, "cpu")
        if dev == "cuda":
            rates["cuda"] = measure(dense, "cuda")
        return rates, "; ".join(r.line() for r in rates.values() if r)
    except Exception as exc:  # an estimate: a config transformers cannot build one layer of gets none
        why = str(exc).splitlines()[0][:120] if str(exc) else ""
        return {"cpu": None, "cuda": None}, f"not measured ({type(exc).__name__}: {why})"


def _calibrate_stage(b: _Build, calibration_tokens: int) -> HostStage:
    """Layer by layer: one layer in the compute dtype (on a GPU also the next, read ahead as stored)."""
    t, cb, family = b.t, b.cb, b.family
    acts = calibration_tokens * t.hidden * cb
    spilled = acts > MAX_ACTIVATION_BYTES
    bt = CALIBRATION_BATCH * CALIBRATION_SEQ_LEN
    heads = int(b.config.get("num_attention_heads") or 1)
    working = cb * bt * (8 * t.hidden + 3 * family.top_k * family.expert_width + family.num_experts) + \
        2 * cb * CALIBRATION_BATCH * heads * CALIBRATION_SEQ_LEN**2  # eager attention: scores and softmax
    gram = GRAM_TOKENS * family.num_experts * t.expert_params  # every expert on the shared sample
    ahead = b.dev != "cpu"  # calibrate reads the next layer ahead on a GPU only (edgeconv.stages.calibrate)
    layers = t.largest_layer * (cb + (b.sb if ahead else 0))
    return HostStage(
        "calibrate", b.dev, PROCESS_BYTES + t.embed_params * cb + layers + (0 if spilled else acts) + working,
        f"layer by layer in {_dtype(cb)}: embeddings {gb(t.embed_params * cb)} + the largest layer"
        f"{' and the next one (read ahead)' if ahead else ''} {gb(layers)} + activations {gb(acts)}"
        f"{' on disk (over 4 GiB)' if spilled else ''} + batch {gb(working)}",
        _slowest(b.compute_time(calibration_tokens * (t.compute_params - t.head_params) + gram, b.dev),
                 _disk_time(t.bytes)),
        [Item("activation spill", acts if spilled else 0, b.student_work, until="calibrate")])


def _assemble_stage(b: _Build) -> HostStage:
    """Streamed on the CPU, about one layer."""
    s_layer = max(b.student_layers.values(), default=0)
    return HostStage(
        "assemble", "cpu", PROCESS_BYTES + 2 * s_layer * 4 + b.t.embed_params * b.sb,
        "one student layer in fp32 (twice, merging) + the largest tensor", _disk_time(2 * b.student_bytes),
        [Item("assembled student", b.student_bytes, b.student_work)])


def _distill_stages(b: _Build, cfg) -> tuple[list[HostStage], dict]:
    """Online: one stage with the whole teacher. Offline: the cache pass, then the student alone."""
    t, cb = b.t, b.cb
    tokens = cfg.trained_tokens
    n = (cfg.batch_size // cfg.grad_accum) * cfg.seq_len  # tokens per micro-batch in one process
    s_layers_n = len(b.student_layers) or b.family.num_layers
    s_width = int(b.dense["intermediate_size"])
    hq, hkv = _attention_widths(b.dense)
    layer_acts = n * s_layers_n * (6 * t.hidden + 6 * hq + 4 * hkv + 4 * s_width) * cb
    logits = n * t.vocab * 4  # one fp32 [micro-batch, vocabulary] tensor
    if cfg.lora_rank:  # the student frozen in fp32; the adapters (every linear: r x (in + out)) train
        trained = cfg.lora_rank * s_layers_n * (7 * t.hidden + 2 * hq + 2 * hkv + 3 * s_width)
        states = 4 * b.student_params + ADAMW_BYTES_PER_PARAM * trained
        student_how = (f"the student frozen in fp32 {gb(4 * b.student_params)} + rank-{cfg.lora_rank} LoRA adapters "
                       f"with grads and AdamW {gb(ADAMW_BYTES_PER_PARAM * trained)}")
        passes_per_token = 2  # forward, and the backward's input gradients (no weight gradients)
    else:
        trained = b.student_params
        states = ADAMW_BYTES_PER_PARAM * b.student_params
        student_how = f"student + grads + AdamW {gb(states)} (16 B x {count(b.student_params)} params)"
        passes_per_token = 3
    saves = max(0, math.ceil(cfg.steps / cfg.checkpoint_every) - 1)
    ckpts = min(saves, cfg.keep_checkpoints + 1) * CHECKPOINT_BYTES_PER_PARAM * trained
    distill = {"mode": cfg.mode, "tokens": tokens, "top_k": cfg.top_k, "tokens_per_step": cfg.tokens_per_step,
               "lora_rank": cfg.lora_rank}
    train_writes = [Item("checkpoints", ckpts, b.student_work, until="distill"),
                    Item("distilled student", b.student_bytes, b.work)]
    teacher_mem = t.params * cb
    if cfg.mode != "offline":
        train_acts = layer_acts + LOGITS_COPIES["online"] * logits
        return [HostStage(
            "distill", b.dev, PROCESS_BYTES + teacher_mem + states + train_acts,
            f"the whole teacher {gb(teacher_mem)} ({_dtype(cb)}) + {student_how} + activations {gb(train_acts)}",
            b.compute_time(tokens * (passes_per_token * b.student_compute + t.compute_params), b.dev),
            train_writes, note="online")], distill

    per_token = cache_bytes_per_token(cfg.top_k, t.vocab)
    distill["bytes_per_token"] = per_token
    train_acts = layer_acts + LOGITS_COPIES["offline"] * logits
    return [_cache_stage(b, tokens, n, logits, per_token), HostStage(
        "distill", b.dev, PROCESS_BYTES + states + train_acts, f"{student_how} + activations {gb(train_acts)}",
        b.compute_time(tokens * passes_per_token * b.student_compute, b.dev), train_writes,
        note="offline: the student alone")], distill


def _cache_stage(b: _Build, tokens: int, n: int, logits: int, per_token: int) -> HostStage:
    """The offline cache pass: the whole teacher when it fits, else layer by layer (edgeconv.forward's rule)."""
    from edgeconv.forward.layer_by_layer import ALLOWANCE, LOGITS_BYTES, ForwardOptions

    t, cb = b.t, b.cb
    teacher_mem = t.params * cb
    compute = b.compute_time(tokens * t.compute_params, b.dev)
    if b.whole_fits(teacher_mem, ALLOWANCE + 3 * logits, b.dev):
        memory = PROCESS_BYTES + teacher_mem + 3 * logits + 4 * n * t.hidden * cb
        how = f"the whole teacher {gb(teacher_mem)} ({_dtype(cb)}) + a micro-batch's logits {gb(3 * logits)}"
        seconds = _slowest(compute, _disk_time(t.bytes))
    else:
        hidden = tokens * t.hidden * cb
        chunk = min(ForwardOptions.max_activation_bytes, hidden)
        passes = math.ceil(hidden / chunk)
        head_mem = (1 if t.tied else 2) * t.head_params * cb
        memory = PROCESS_BYTES + head_mem + t.largest_layer * (cb + b.sb) + chunk + 2 * LOGITS_BYTES
        how = (f"layer by layer in {_dtype(cb)}, {passes} pass{'es' if passes > 1 else ''}: embeddings + head "
               f"{gb(head_mem)} + the largest layer and the next {gb(t.largest_layer * (cb + b.sb))} + "
               f"activations {gb(chunk)}")
        seconds = _slowest(compute, _disk_time(passes * t.bytes))
    return HostStage("cache", b.dev, memory, how, seconds,
                     [Item("teacher cache", per_token * tokens, b.student_work / "distill", until="distill")])


def _export_stage(b: _Build, path: Path, fmt: str, quant: str, quant_bytes: int) -> HostStage:
    """The float GGUF and the quantized one (CPU), parity against the torch student in fp32."""
    from edgeconv.forward.layer_by_layer import ALLOWANCE, ONE_PASS_ABOVE

    float_type = "BF16" if b.t.dtype == "bfloat16" else "F32"
    float_bytes = (weight_bytes(b.student_shapes, "gguf", float_type, config=b.dense, tokenizer=path)
                   if fmt == "gguf" else 0)
    whole = b.student_params * 4
    if whole <= ONE_PASS_ABOVE and b.whole_fits(whole, ALLOWANCE, b.dev):
        memory, how = PROCESS_BYTES + whole, f"parity reference: the student whole in fp32 {gb(whole)}"
    else:
        s_layer = max(b.student_layers.values(), default=0)
        memory = PROCESS_BYTES + s_layer * (4 + b.sb) + 2 * b.t.head_params * 4
        how = f"parity reference layer by layer (the student whole in fp32 would be {gb(whole)})"
    return HostStage(
        "export", b.dev, memory, how,
        _disk_time(b.student_bytes + 2 * float_bytes + quant_bytes + b.student_bytes),
        [Item(f"{float_type} GGUF", float_bytes, b.work / "export", until="export"),
         Item(f"{quant} {fmt}", quant_bytes, b.work / "export")])


def plan_host(*, config: dict, family, path: Path, dense: dict, student_params: int, student_shapes: dict,
              fmt: str, quant: str, quant_bytes: int, target_bytes: int, out: Path, work: Path,
              calibration_tokens: int, distill_config, eval_bytes: int, bench: bool, measure_throughput: bool = True,
              host: Host | None = None) -> HostPlan:
    """The host block of `build --dry-run`. `dense` is the student's config.json, `distill_config` build's
    DistillConfig (None without distillation), `quant_bytes` and `target_bytes` the target estimate's weights and
    total; `host` defaults to this machine."""
    host = host or Host.detect()
    args = {k: v for k, v in locals().items() if k != "args"}  # to re-plan with fewer tokens
    t = teacher_shape(config, family, path)
    rates, measure_note = _measure_rates(dense, host.accelerator, measure_throughput)
    b = _Build(host, t, family, config, dense, student_params, student_shapes, work, rates)

    stages = [_calibrate_stage(b, calibration_tokens), _assemble_stage(b)]
    distill: dict = {}
    if distill_config is not None:
        more, distill = _distill_stages(b, distill_config)
        stages += more
    stages.append(_export_stage(b, path, fmt, quant, quant_bytes))
    stages.append(HostStage("bundle", "cpu", PROCESS_BYTES, "copies files", _disk_time(2 * (quant_bytes + eval_bytes)),
                            [Item("bundle", quant_bytes + eval_bytes, out)]))
    if bench:
        stages.append(HostStage("bench", "cpu", target_bytes, "bench.py, its own process: the bundle at the "
                                "target's context (the target estimate)",
                                b.compute_time(BENCH_TOKENS * b.student_compute, "cpu")))

    problems = [_memory_problem(s, host.memory_of(s.device), host, student_params, distill)
                for s in stages if s.memory > host.memory_of(s.device)]
    disks = _disk_needs(stages, out, work)
    for disk in disks:
        if not disk.fits:
            if disk.items and disk.items[0].name == "teacher cache":
                distill["fit_tokens"] = _tokens_that_fit(args)
            problems.append(_disk_problem(disk, distill))
    return HostPlan(host, t, student_params, stages, disks, rates, measure_note, t.file_bytes is None, problems,
                    distill)


def _memory_problem(s: HostStage, limit: int, host: Host, student_params: int, distill: dict) -> EdgeconvError:
    what = "RAM" if s.device == "cpu" else f"GPU memory ({host.gpu})"
    problem = f"{s.name} needs about {gb(s.memory)} on {s.device} ({s.memory_how}); this host has {gb(limit)} of {what}"
    if s.name == "distill" and distill.get("mode") == "online":
        hint = ("pass --distill-mode offline (the teacher's top-k log-probs are cached first, layer by layer when it "
                f"does not fit, then the student trains alone: {gb(ADAMW_BYTES_PER_PARAM * student_params)} "
                "for it and its AdamW states), "
                "or --distill-tokens 0 to skip distillation")
    elif s.name == "distill" and not distill.get("lora_rank"):
        states = gb(ADAMW_BYTES_PER_PARAM * student_params)
        hint = (f"the student's weights, gradients and AdamW states alone are {states}: pass --distill-lora-rank 16 "
                f"(the student frozen, {gb(4 * student_params)}, LoRA adapters trained), distill on a machine that "
                "holds them (the cache can be filled here: `edgeconv distill --mode offline --cache-only`), "
                "pick a smaller --groups, or pass --distill-tokens 0 to skip distillation")
    elif s.name == "distill":
        hint = (f"the frozen student alone is {gb(4 * student_params)} in fp32: distill on a machine that holds it, "
                "pick a smaller --groups, or pass --distill-tokens 0 to skip distillation")
    elif s.name == "cache":
        hint = "fill the cache on a machine with more memory (`edgeconv distill --mode offline --cache-only`)"
    elif s.name == "calibrate":
        hint = "lower --calibration-tokens to keep fewer activations, or build on a machine with more memory"
    elif s.name == "bench":
        hint = "pass --no-bench and run bench.py on the device"
    else:
        hint = "build on a machine with more memory"
    return EdgeconvError(problem, hint)


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def tree_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _disk_needs(stages: list[HostStage], out: Path, work: Path) -> list[DiskNeed]:
    """Per filesystem: the bytes live at the worst stage, against the free space there."""
    order = [s.name for s in stages]
    items = [(i, order.index(s.name)) for s in stages for i in s.writes if i.bytes]
    by_dev: dict[int, list[tuple[Item, int]]] = {}
    anchor: dict[int, Path] = {}
    for path in (out, work):  # OUT and OUT.work are always listed, even when nothing big goes there
        d = os.stat(_existing(path)).st_dev
        anchor.setdefault(d, _existing(path))
        by_dev.setdefault(d, [])
    for item, start in items:
        d = os.stat(_existing(item.where)).st_dev
        anchor.setdefault(d, _existing(item.where))
        by_dev.setdefault(d, []).append((item, start))
    needs = []
    for d, its in by_dev.items():
        best, best_stage, best_items = 0, order[0] if order else "-", []
        for k, name in enumerate(order):
            live = [i for i, start in its if start <= k and (i.until is None or order.index(i.until) >= k)]
            total = sum(i.bytes for i in live)
            if total > best:
                best, best_stage, best_items = total, name, sorted(live, key=lambda i: -i.bytes)
        present = sum(tree_bytes(p) for p in (out, work) if os.stat(_existing(p)).st_dev == d and p.exists())
        needs.append(DiskNeed(anchor[d], best, best_stage, best_items, present, shutil.disk_usage(anchor[d]).free))
    return needs


def _tokens_that_fit(args: dict) -> int:
    """The largest distillation budget (whole steps) whose build fits every disk: fewer tokens shrink the cache
    and the checkpoints, nothing grows. 0 if not even one step fits."""
    cfg = args["distill_config"]
    lo, hi = 0, cfg.steps - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        trial = plan_host(**{**args, "measure_throughput": False,
                             "distill_config": cfg.model_copy(update={"tokens": mid * cfg.tokens_per_step})})
        if all(d.fits for d in trial.disks):
            lo = mid
        else:
            hi = mid - 1
    return lo * cfg.tokens_per_step


def _disk_problem(disk: DiskNeed, distill: dict) -> EdgeconvError:
    parts = ", ".join(f"{i.name} {gb(i.bytes)}" for i in disk.items)
    biggest = disk.items[0] if disk.items else None
    problem = (f"the build needs {disk.needed:,} bytes ({gb(disk.needed)}) on the disk of {disk.where} at its peak "
               f"(during {disk.peak_stage}: {parts}), {disk.free:,} bytes ({gb(disk.free)}) are free")
    room = f"--out on a disk with {gb(disk.needed)} free"
    if biggest and biggest.name == "teacher cache":
        per_token, fit_tokens = distill["bytes_per_token"], distill.get("fit_tokens", 0)
        fewer = f"--distill-tokens {fit_tokens:,} or fewer, " if fit_tokens > 0 else ""
        hint = (f"the teacher cache ({per_token} B/token x {distill['tokens']:,} tokens) is the largest: pass "
                f"{fewer}--distill-mode online (no cache), or {room}")
    elif biggest and biggest.name == "checkpoints":
        hint = f"distillation checkpoints (12 B per student parameter) are the largest: {room}, or a smaller --groups"
    elif biggest and biggest.name == "activation spill":
        hint = f"the calibration activations spill to disk: lower --calibration-tokens, or {room}"
    else:
        hint = f"{room}, or a smaller student (--groups)"
    return EdgeconvError(problem, hint)
