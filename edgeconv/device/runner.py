#!/usr/bin/env python3
"""edgeconv's on-device benchmark runner: copied verbatim into every bundle as `bench.py`.

    python bench.py                      # in the bundle directory, with llama-cpp-python installed
    python bench.py --threads 4 --gpu-layers -1 --quick

Runs with Python 3.8+ and only the model's runtime installed: llama-cpp-python for a .gguf file, or
onnxruntime-genai for a model directory holding genai_config.json (numpy comes with either). It never
imports torch or edgeconv. In order:

  1. verify: every file listed in manifest.json must be inside the bundle and have its size and sha256, and the
     manifest's model must be among those files, else exit 2 before loading. results.json says "verified": true
     only when every file the run read was one of them (false with a note when --model or --data point elsewhere);
  2. load the model (seconds, RSS before and after);
  3. speed at each prompt length: time to first token, prefill tokens/s, and decode tokens/s timed over
     the forward passes only (sampling excluded, as llama.cpp's llama-bench "tg" test does);
     median of --repeats after one warm-up;
  4. accuracy on the bundled evaluation data, with the definitions of edgeconv's evaluation suite
     (edgeconv/evaluation/suite.py): perplexity per corpus, exact match per skill, multiple choice;
  5. write results.json (schema "edgeconv-bench/1") with the device's description, and print a summary.

Also importable: verify_bundle(bundle) -> list of problems, run(args) -> the results dict.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and sys.path and not getattr(sys.flags, "safe_path", False):
    # `python bench.py` puts the bundle's directory first on sys.path, so a file dropped next to bench.py
    # (json.py, hashlib.py) would be imported instead of the standard library's, before anything is verified.
    # Python 3.11's -P leaves it out; earlier ones need this, before the imports below.
    del sys.path[0]

import argparse
import datetime
import glob
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path, PurePath

SCHEMA = "edgeconv-bench/1"
MANIFEST = "manifest.json"

# The evaluation suite's defaults (edgeconv.evaluation.suite.evaluate), and the smaller --quick set.
FULL = {"tokens": 16384, "window": 256, "examples": 50, "choices": 200, "max_new": 32}
QUICK = {"tokens": 2048, "window": 256, "examples": 10, "choices": 40, "max_new": 32}
SCORING_CONTEXT = 512  # edgeconv's gguf runtime scores in a 512-token context; same numbers need the same one

# Used for speed prompts only when no evaluation text is there to tokenize.
FALLBACK_TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the "
                 "slings and arrows of outrageous fortune, or to take arms against a sea of troubles. ")


class BenchError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


class RefusedError(BenchError):
    """The bundle does not match its manifest."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Bundle: manifest and hash verification
# ---------------------------------------------------------------------------------------------------------

def load_manifest(bundle: Path):
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise RefusedError(f"manifest.json is not valid JSON ({exc})")
    if not isinstance(manifest, dict):
        raise RefusedError("manifest.json does not hold a JSON object")
    return manifest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def unsafe_path(rel: str) -> bool:
    """An absolute path, one with `..`, or one that names nothing (".")."""
    parts = PurePath(rel).parts
    return PurePath(rel).is_absolute() or ".." in parts or not parts or rel.startswith(("/", "\\"))


def _inside(root: Path, rel: str) -> bool:
    """Whether ROOT/REL, symbolic links followed, stays inside ROOT (ROOT already resolved)."""
    try:
        (root / rel).resolve().relative_to(root)
    except ValueError:
        return False
    return True


def model_problems(manifest: dict) -> list:
    """The manifest's `model` must be a relative path inside the bundle naming hashed files (one file, or the
    directory of an onnxruntime-genai model); no `model` at all leaves bench.py to find the one model there."""
    model = manifest.get("model")
    if model is None or model == "":
        return []
    if not isinstance(model, str) or unsafe_path(model):
        return ["model {} in manifest.json is not a path inside the bundle".format(model)]
    want = PurePath(model).parts
    if not any(PurePath(rel).parts[:len(want)] == want for rel in manifest.get("files") or {}):
        return ["model {} in manifest.json is not among its hashed files".format(model)]
    return []


def verify_bundle(bundle) -> list:
    """Problems found checking every file of manifest.json's `files` (inside the bundle, size first, then sha256),
    that bench.py is one of them and that the manifest's model is; [] if none. edgeconv runs the same checks
    (edgeconv/bundle/verify.py) before it starts bench.py; keep the two in step."""
    bundle = Path(bundle)
    try:
        manifest = load_manifest(bundle)
    except RefusedError as exc:
        return [str(exc)]
    if manifest is None:
        return [f"{bundle} has no manifest.json"]
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return ["manifest.json lists no files"]
    root = bundle.resolve()
    problems = []
    for rel, want in sorted(files.items()):
        if unsafe_path(rel):  # a manifest must not point outside its bundle
            problems.append(f"{rel} in manifest.json is not a path inside the bundle")
            continue
        if not _inside(root, rel):
            problems.append(f"{rel} leads outside the bundle (a symbolic link)")
            continue
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
            continue
        size = path.stat().st_size
        if isinstance(want, dict) and "bytes" in want and size != want["bytes"]:
            problems.append("{} does not match manifest.json (size {} bytes, expected {}: the file was truncated,"
                            " damaged or replaced)".format(rel, size, want["bytes"]))
            continue
        if not isinstance(want, dict) or sha256_file(path) != want.get("sha256"):
            problems.append(f"{rel} does not match manifest.json (sha256 differs: the file was modified or damaged)")
    if "bench.py" not in files:
        problems.append("bench.py is not listed in manifest.json")
    return problems + model_problems(manifest)


def hashed_files(bundle: Path, manifest: dict) -> set:
    """The resolved paths of the files manifest.json lists (after verify_bundle: the files that matched)."""
    root = Path(bundle).resolve()
    return {(root / rel).resolve() for rel in manifest.get("files") or {}}


def files_read(model: Path, data_dir, data) -> list:
    """Every file this run reads besides manifest.json: the model (all of an onnxruntime-genai directory) and the
    three evaluation files when they were loaded."""
    model = Path(model)
    paths = sorted(p for p in model.rglob("*") if p.is_file()) if model.is_dir() else [model]
    if data is not None:
        paths += [Path(data_dir) / f for f in ("text.jsonl", "skills.jsonl", "choice.jsonl")]
    return paths


# ---------------------------------------------------------------------------------------------------------
# Memory and device description
# ---------------------------------------------------------------------------------------------------------

def rss_mb():
    """The current resident set size in MB, or None where it cannot be read."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    try:  # macOS and other Unixes without /proc: ps prints KiB
        out = subprocess.run(["ps", "-o", "rss=", "-p", str(os.getpid())], capture_output=True, text=True,
                             timeout=5, check=False).stdout.strip()
        return int(out) / 1024.0 if out else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def peak_rss_mb():
    """The process's peak RSS in MB so far. On Linux VmHWM from /proc/self/status: it belongs to the address
    space, which exec replaces, whereas ru_maxrss survives exec and starts at the high-water mark of the
    process that launched this one (a runner started from a 3 GB parent would report 3 GB). Elsewhere
    ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def _read(path: str):
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("utf-8", "replace").replace("\x00", "").strip() or None
    except OSError:
        return None


def _command(args: list):
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def cpu_model():
    info = _read("/proc/cpuinfo") or ""
    for key in ("model name", "Hardware", "Processor", "cpu model", "uarch"):
        for line in info.splitlines():
            if line.split(":")[0].strip() == key and ":" in line:
                return line.split(":", 1)[1].strip()
    if sys.platform == "darwin":
        return _command(["sysctl", "-n", "machdep.cpu.brand_string"])
    return platform.processor() or None


def total_memory_mb():
    info = _read("/proc/meminfo") or ""
    for line in info.splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 1024.0, 1)
    if sys.platform == "darwin":
        out = _command(["sysctl", "-n", "hw.memsize"])
        return round(int(out) / 2 ** 20, 1) if out and out.isdigit() else None
    return None


def gpus():
    out = _command(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"])
    return [line.strip() for line in out.splitlines() if line.strip()] if out else []


def usable_cores():
    """CPUs this process may run on (a container or taskset can allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def default_threads(manifest: dict):
    """The bundle's thread count, capped at the usable cores: more llama.cpp threads than cores only make them
    wait on each other (4 threads on 2 cores decoded 10x slower than 2 in our runs). Returns (threads, wanted)."""
    cores = usable_cores() or 1
    wanted = int(manifest.get("threads") or cores)
    return min(wanted, cores), wanted


def parse_nvpmodel(text: str) -> dict:
    """`nvpmodel -q` -> {"mode": "MAXN", "id": 0}: the line "NV Power Mode: NAME", then the mode's number."""
    mode, mode_id, seen = None, None, False
    for line in (text or "").splitlines():
        line = line.strip()
        if line.startswith("NV Power Mode:"):
            mode, seen = line.split(":", 1)[1].strip() or None, True
        elif seen and line.isdigit():
            mode_id = int(line)
            break
    return {"mode": mode, "id": mode_id}


def parse_jetson_clocks(text: str):
    """`jetson_clocks --show` -> True when it pinned the clocks (MinFreq = MaxFreq on every online CPU and on the
    GPU, what `sudo jetson_clocks` sets), False when some still scale, None when the output says neither."""
    pinned = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not (line.startswith("cpu") or line.startswith("GPU ")) or "MinFreq=" not in line:
            continue
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if fields.get("Online") == "0" or "MaxFreq" not in fields:
            continue
        pinned.append(fields["MinFreq"] == fields["MaxFreq"])
    return all(pinned) if pinned else None


def _sysfs_clocks_pinned(sysfs: str):
    """jetson_clocks' effect read from sysfs (its --show needs root): min = max frequency on every CPU's cpufreq
    and the GPU's devfreq. None when none of them can be read."""
    pairs = [(d + "/scaling_min_freq", d + "/scaling_max_freq")
             for d in sorted(glob.glob(sysfs + "/devices/system/cpu/cpu[0-9]*/cpufreq"))]
    pairs += [(d + "/min_freq", d + "/max_freq") for d in sorted(glob.glob(sysfs + "/class/devfreq/*gpu*"))]
    pinned = []
    for lo, hi in pairs:
        a, b = _read(lo), _read(hi)
        if a and b:
            pinned.append(a == b)
    return all(pinned) if pinned else None


def _tool_output(args: list):
    """ARGS' output, run as this user, else through `sudo -n` (never asks for a password); None if neither ran."""
    for cmd in (args, ["sudo", "-n"] + args):
        if cmd[0] == "sudo" and not shutil.which("sudo"):
            continue
        out = _command(cmd)
        if out:
            return out, " ".join(cmd)
    return None, None


def jetson_power() -> dict:
    """The Jetson's power mode (`nvpmodel -q`) and whether `jetson_clocks` pinned its clocks, each None where the
    tool is not installed: a Jetson's speed depends on both (MAXN with pinned clocks decodes far faster than a
    15 W mode left to scale), so its figures mean little without them."""
    out = {"nvpmodel": None, "jetson_clocks": None}
    if shutil.which("nvpmodel"):
        text, how = _tool_output(["nvpmodel", "-q"])
        out["nvpmodel"] = dict(parse_nvpmodel(text), source=how)
    if shutil.which("jetson_clocks"):
        text, how = _tool_output(["jetson_clocks", "--show"])
        on = parse_jetson_clocks(text) if text else None
        if on is None:
            sysfs = os.environ.get("EDGECONV_SYSFS", "/sys")  # tests point it at a copy
            on, how = _sysfs_clocks_pinned(sysfs), "min = max frequency in " + sysfs
        out["jetson_clocks"] = {"on": on, "source": how}
    return out


def device_info() -> dict:
    cores = os.cpu_count()
    usable = usable_cores()
    board = _read("/proc/device-tree/model")  # Jetsons and other ARM boards name themselves here
    device = {
        "platform": platform.platform(),
        "system": platform.system(),
        "machine": platform.machine(),
        "processor": cpu_model(),
        "logical_cores": cores,
        "usable_cores": usable,
        "memory_total_mb": total_memory_mb(),
        "board_model": board,
        "jetson_model": board if board and ("jetson" in board.lower() or os.path.exists("/etc/nv_tegra_release"))
        else None,
        "android_model": _command(["getprop", "ro.product.model"]) if "ANDROID_ROOT" in os.environ else None,
        "gpu": gpus(),
        "python": platform.python_version(),
        "hostname": platform.node(),
    }
    device.update(jetson_power())  # nvpmodel, jetson_clocks: None where those tools are not installed
    return device


# ---------------------------------------------------------------------------------------------------------
# Evaluation data (the three JSONL files of edgeconv.evaluation.data)
# ---------------------------------------------------------------------------------------------------------

def _rows(path: Path):
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                yield json.loads(line)
            except ValueError:
                raise BenchError(f"{path}:{n} is not valid JSON; re-copy the bundle")


def load_eval_data(path: Path):
    """(texts {corpus: [doc]}, skills {skill: [(prompt, answer)]}, choices [item]); None if not there."""
    path = Path(path)
    if not all((path / f).is_file() for f in ("text.jsonl", "skills.jsonl", "choice.jsonl")):
        return None
    texts, skills = {}, {}
    for row in _rows(path / "text.jsonl"):
        texts.setdefault(row["corpus"], []).append(row["text"])
    for row in _rows(path / "skills.jsonl"):
        skills.setdefault(row["skill"], []).append((row["prompt"], row["answer"]))
    return texts, skills, list(_rows(path / "choice.jsonl"))


def spread(items: list, n: int) -> list:
    """`n` items taken evenly across corpora (the file lists one corpus after another), as the suite does."""
    by_corpus = {}
    for item in items:
        by_corpus.setdefault(item["corpus"], []).append(item)
    per = max(1, n // max(1, len(by_corpus)))
    return [item for group in by_corpus.values() for item in group[:per]]


# ---------------------------------------------------------------------------------------------------------
# Metrics: the definitions of edgeconv/evaluation/suite.py, on any scorer with encode, decode, eos_id,
# logits(ids) -> [len(ids), vocab] and greedy(ids, max_new) -> text
# ---------------------------------------------------------------------------------------------------------

def target_logprobs(logits, ids: list):
    """log p(ids[i] | ids[:i]) for i >= 1, in float64 like the suite's log_softmax. Rows go through in chunks
    (each row's arithmetic is the same, so the numbers are too) to keep a large vocabulary's float64 copy small."""
    import numpy as np

    n = len(ids) - 1
    out = np.empty(n, dtype=np.float64)
    targets = np.asarray(ids[1:])
    for lo in range(0, n, 32):
        rows = np.asarray(logits[lo:min(n, lo + 32)]).astype(np.float64)
        m = rows.max(axis=-1, keepdims=True)
        lp = rows - m - np.log(np.exp(rows - m).sum(axis=-1, keepdims=True))
        out[lo:lo + len(rows)] = lp[np.arange(len(rows)), targets[lo:lo + len(rows)]]
    return out


def perplexity(rt, docs: list, tokens: int, window: int):
    """Documents joined with EOS, the first `tokens` cut into windows of `window`; every token but a window's
    first is scored. Returns (perplexity, scored tokens)."""
    ids = []
    for doc in docs:
        ids.extend(rt.encode(doc))
        if rt.eos_id is not None:
            ids.append(rt.eos_id)
        if len(ids) >= tokens:
            break
    ids = ids[:tokens]
    windows = [ids[i:i + window] for i in range(0, len(ids) - 1, window)]
    windows = [w for w in windows if len(w) >= 2]
    nll, count = 0.0, 0
    for w in windows:
        lp = target_logprobs(rt.logits(w), w)
        nll -= float(lp.sum())
        count += len(lp)
    return (math.exp(nll / count) if count else None), count


def solved(rt, prompt: str, answer: str, max_new: int) -> bool:
    return rt.greedy(rt.encode(prompt), max_new).strip() == answer


def choice_scores(rt, item: dict):
    """(index by summed log-probability, index by log-probability per character). As lm-eval does, the
    context's trailing whitespace moves to the front of each choice and the pair is tokenized as one text."""
    import numpy as np

    context = item["context"]
    lead = context[len(context.rstrip()):]
    context = context[: len(context) - len(lead)]
    n_context = len(rt.encode(context))
    sums = []
    for choice in item["choices"]:
        whole = rt.encode(context + lead + choice)
        lp = target_logprobs(rt.logits(whole), whole)
        sums.append(float(lp[-(len(whole) - n_context):].sum()))
    norm = [s / max(1, len(c)) for s, c in zip(sums, item["choices"])]
    return int(np.argmax(sums)), int(np.argmax(norm))


def accuracy(rt, data, settings: dict) -> dict:
    texts, skills, choices = data
    ppl, counts, em = {}, {}, {}
    for corpus, docs in texts.items():
        log(f"  perplexity {corpus} ...")
        ppl[corpus], counts[corpus] = perplexity(rt, docs, settings["tokens"], settings["window"])
    log("  exact match, {} skills x {} examples ...".format(len(skills), settings["examples"]))
    for skill, examples in skills.items():
        chosen = examples[:settings["examples"]]
        em[skill] = sum(solved(rt, p, a, settings["max_new"]) for p, a in chosen) / len(chosen)
    items = spread(choices, settings["choices"])
    log(f"  multiple choice, {len(items)} items ...")
    hits = [0, 0]
    for item in items:
        acc, acc_norm = choice_scores(rt, item)
        hits[0] += acc == item["label"]
        hits[1] += acc_norm == item["label"]
    n = max(1, len(items))
    return {
        "perplexity": ppl,
        "exact_match": em,
        "exact_match_mean": sum(em.values()) / len(em) if em else None,
        "choice_acc": hits[0] / n if items else None,
        "choice_acc_norm": hits[1] / n if items else None,
        "settings": dict(settings, perplexity_tokens=counts, choice_items=len(items),
                         exact_match_examples={s: min(settings["examples"], len(e)) for s, e in skills.items()}),
    }


# ---------------------------------------------------------------------------------------------------------
# llama.cpp (llama-cpp-python)
# ---------------------------------------------------------------------------------------------------------

# GGUF general.file_type -> name, for a model whose bundle manifest does not say its quantization.
GGUF_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
                   12: "Q3_K_M", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


def _quiet_llama_cpp():
    import llama_cpp

    try:  # llama.cpp's per-tensor load log goes through this logger (llama-cpp-python >= 0.2.80)
        from llama_cpp._logger import set_verbose
        set_verbose(False)
    except ImportError:
        pass
    return llama_cpp


class LlamaCppScorer:
    """Logits for every position, as edgeconv's gguf runtime: a fresh `eval` then `scores` (its `echo` logprobs
    are shifted by one, llama-cpp-python issue 1983); llama.cpp's own GGUF tokenizer."""

    def __init__(self, lib, path: Path, threads: int, gpu_layers: int, n_ctx: int, flash_attn: bool):
        kwargs = {"model_path": str(path), "n_ctx": n_ctx, "n_batch": n_ctx, "logits_all": True, "verbose": False,
                  "seed": 0, "n_threads": threads, "n_threads_batch": threads, "n_gpu_layers": gpu_layers}
        if flash_attn:
            kwargs["flash_attn"] = True
        self.llm = lib.Llama(**kwargs)
        self.n_ctx = n_ctx
        self.eos_id = self.llm.token_eos()

    def encode(self, text: str) -> list:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def decode(self, ids: list) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def logits(self, ids: list):
        if len(ids) > self.n_ctx:
            raise BenchError(f"a {len(ids)}-token sequence is longer than the scoring context {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(ids)
        return self.llm.scores[: len(ids)]

    def greedy(self, ids: list, max_new: int, stop: str = "\n") -> str:
        import numpy as np

        self.llm.reset()
        self.llm.eval(list(ids))
        new = []
        for _ in range(max_new):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            if token == self.eos_id:
                break
            new.append(token)
            text = self.decode(new)
            if stop in text:
                return text.split(stop)[0]
            self.llm.eval([token])
        return self.decode(new)

    def close(self) -> None:
        self.llm.close()


class LlamaCpp:
    """The speed model: logits of the last position only, driven through llama.cpp's C API so the timed region
    is llama_decode + llama_synchronize and nothing else (the batch is filled before the clock starts)."""

    name = "llama.cpp"

    def __init__(self, path: Path, args):
        self.lib = _quiet_llama_cpp()
        self.path = path
        self.args = args
        kwargs = {"model_path": str(path), "n_ctx": args.context, "n_threads": args.threads,
                  "n_threads_batch": args.threads, "n_gpu_layers": args.gpu_layers, "logits_all": False,
                  "verbose": False}
        if args.flash_attn:
            kwargs["flash_attn"] = True
        try:
            self.llm = self.lib.Llama(**kwargs)
        except (ValueError, RuntimeError) as exc:
            raise BenchError(f"llama.cpp could not load {path.name} ({exc})")
        self.ctx = self.llm.ctx
        self.n_vocab = self.llm.n_vocab()
        self.n_batch = self.llm.n_batch
        self.batch = self.lib.llama_batch_init(self.n_batch, 0, 1)
        self._view = None
        self.eos_id = self.llm.token_eos()

    @property
    def version(self) -> str:
        return getattr(self.lib, "__version__", "?")

    def describe(self) -> dict:
        meta = dict(getattr(self.llm, "metadata", {}) or {})
        info = {"n_ctx_train": self.n_ctx_train(), "n_vocab": self.n_vocab,
                "system_info": self.lib.llama_print_system_info().decode("utf-8", "replace").strip()}
        try:
            info["gpu_offload_supported"] = bool(self.lib.llama_supports_gpu_offload())
        except AttributeError:
            pass
        ftype = meta.get("general.file_type")
        if ftype is not None and str(ftype).isdigit():
            info["file_type"] = GGUF_FILE_TYPES.get(int(ftype), f"type {ftype}")
        for key in ("general.architecture", "general.name"):
            if key in meta:
                info[key.split(".")[1]] = meta[key]
        return info

    def n_ctx_train(self):
        """The context the model was trained with (None if this binding cannot say: no cap then)."""
        fn = getattr(self.llm, "n_ctx_train", None) or getattr(getattr(self.llm, "_model", None), "n_ctx_train", None)
        value = fn() if fn is not None else None
        return int(value) if value else None

    def encode(self, text: str) -> list:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def clear(self) -> None:
        lib, ctx = self.lib, self.ctx
        if hasattr(lib, "llama_memory_clear"):
            lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        elif hasattr(lib, "llama_kv_self_clear"):
            lib.llama_kv_self_clear(ctx)
        else:
            lib.llama_kv_cache_clear(ctx)

    def _fill(self, tokens: list, pos0: int) -> None:
        b = self.batch
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 0
        b.logits[len(tokens) - 1] = 1
        b.n_tokens = len(tokens)

    def _decode(self) -> None:
        rc = self.lib.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise BenchError(f"llama_decode failed (code {rc}); lower --context or the prompt lengths")
        self.lib.llama_synchronize(self.ctx)

    def _argmax_last(self) -> int:
        import ctypes

        import numpy as np

        ptr = self.lib.llama_get_logits_ith(self.ctx, -1)
        addr = ctypes.cast(ptr, ctypes.c_void_p).value
        if self._view is None or self._view[0] != addr:  # the output buffer rarely moves: keep one numpy view of it
            self._view = (addr, np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)))
        return int(np.argmax(self._view[1]))

    def time_prefill(self, tokens: list):
        """(seconds to process the prompt, seconds until the first token is known, first token)."""
        self.clear()
        start = time.perf_counter()
        for lo in range(0, len(tokens), self.n_batch):
            self._fill(tokens[lo:lo + self.n_batch], lo)  # filling a batch is microseconds against a forward pass
            self._decode()
        processed = time.perf_counter()
        token = self._argmax_last()
        return processed - start, time.perf_counter() - start, token

    def time_decode(self, token: int, pos: int, n: int) -> float:
        """Greedy-decode `n` tokens after position `pos`; returns the seconds spent in the forward passes."""
        spent = 0.0
        self._fill([token], pos)
        b = self.batch
        before = self._perf_eval_ms()
        for i in range(n):
            b.token[0] = token  # the rest of the one-token batch stays as _fill set it
            b.pos[0] = pos + i
            start = time.perf_counter()
            self._decode()
            spent += time.perf_counter() - start
            token = self._argmax_last()
        after = self._perf_eval_ms()
        # llama.cpp's own clock inside llama_decode, as a cross-check of the one above (which adds the ctypes calls)
        self.internal_s = (after - before) / 1000 if before is not None and after is not None else None
        return spent

    def _perf_eval_ms(self):
        perf = getattr(self.lib, "llama_perf_context", None)
        return perf(self.ctx).t_eval_ms if perf is not None else None

    def close(self) -> None:
        if self.batch is not None:
            self.lib.llama_batch_free(self.batch)
            self.batch = None
        self.llm.close()


# ---------------------------------------------------------------------------------------------------------
# onnxruntime-genai
# ---------------------------------------------------------------------------------------------------------

def _eos_from_tokenizer_files(model_dir: Path):
    """The EOS id transformers would use (tokenizer_config.json's eos_token looked up in tokenizer.json), which is
    what edgeconv's onnx-genai runtime joins documents with; None if the files do not say."""
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        tokenizer = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    eos = config.get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if not eos:
        return None
    for added in tokenizer.get("added_tokens", []):
        if added.get("content") == eos:
            return added.get("id")
    vocab = (tokenizer.get("model") or {}).get("vocab")
    return vocab.get(eos) if isinstance(vocab, dict) else None


class GenaiScorer:
    """Logits from a fresh generator fed the whole sequence, as edgeconv's onnx-genai runtime; greedy decoding
    keeps the generator's KV cache and appends one token per step."""

    def __init__(self, owner):
        self.owner = owner
        self.eos_id = owner.eos_id

    def encode(self, text: str) -> list:
        return self.owner.encode(text)

    def decode(self, ids: list) -> str:
        return self.owner.decode(ids)

    def _fits(self, n: int) -> None:
        if n > self.owner.context:
            raise BenchError(f"a {n}-token sequence is longer than the model's context_length "
                             f"{self.owner.context}; lower --window")

    def logits(self, ids: list):
        import numpy as np

        self._fits(len(ids))
        gen = self.owner.generator(len(ids) + 1)
        gen.append_tokens(np.array(ids, dtype=np.int32))
        out = np.array(gen.get_output("logits"))[0].astype(np.float32)
        del gen
        return out

    def greedy(self, ids: list, max_new: int, stop: str = "\n") -> str:
        import numpy as np

        self._fits(len(ids))
        gen = self.owner.generator(len(ids) + max_new + 1)
        gen.append_tokens(np.array(ids, dtype=np.int32))
        new = []
        for _ in range(min(max_new, self.owner.context - len(ids))):
            token = int(np.argmax(np.array(gen.get_output("logits"))[0, -1]))
            if token == self.eos_id:
                break
            new.append(token)
            text = self.decode(new)
            if stop in text:
                return text.split(stop)[0]
            gen.append_tokens(np.array([token], dtype=np.int32))
        return self.decode(new)

    def close(self) -> None:
        pass


class Genai:
    """An onnxruntime-genai model directory (genai_config.json), run by its own generator."""

    name = "onnxruntime-genai"

    def __init__(self, path: Path, args):
        import onnxruntime_genai as og

        self.og = og
        self.path = path
        config = og.Config(str(path))
        if not og.is_cuda_available():  # a CPU-only package cannot use a model built for CUDA's provider
            config.clear_providers()
        if args.threads:
            options = {"intra_op_num_threads": args.threads}
            config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        try:
            self.model = og.Model(config)
        except Exception as exc:  # noqa: BLE001 - onnxruntime-genai raises its own untyped errors
            raise BenchError(f"onnxruntime-genai could not load {path} ({exc})")
        self.tokenizer = og.Tokenizer(self.model)
        genai_config = json.loads((path / "genai_config.json").read_text(encoding="utf-8"))
        self.context = int(genai_config["model"]["context_length"])
        # Some tokenizers add BOS in encode(); edgeconv encodes without special tokens, so drop that prefix.
        self.prefix = [int(t) for t in self.tokenizer.encode("")]
        self.decode_tokens = args.decode_tokens
        self.gen = None
        eos = _eos_from_tokenizer_files(path)
        if eos is None:
            ids = list(self.tokenizer.eos_token_ids) if hasattr(self.tokenizer, "eos_token_ids") else []
            eos = int(ids[0]) if len(ids) else None
        self.eos_id = eos

    @property
    def version(self) -> str:
        return getattr(self.og, "__version__", "?")

    def describe(self) -> dict:
        return {"context_length": self.context, "cuda_available": bool(self.og.is_cuda_available())}

    def n_ctx_train(self):
        return self.context

    def encode(self, text: str) -> list:
        ids = [int(t) for t in self.tokenizer.encode(text)]
        return ids[len(self.prefix):] if self.prefix and ids[:len(self.prefix)] == self.prefix else ids

    def decode(self, ids: list) -> str:
        import numpy as np

        return self.tokenizer.decode(np.array(ids, dtype=np.int32))

    def generator(self, max_length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=min(max_length, self.context))
        return self.og.Generator(self.model, params)

    def _argmax_last(self, gen) -> int:
        import numpy as np

        return int(np.argmax(np.array(gen.get_output("logits"))[0, -1]))

    def time_prefill(self, tokens: list):
        import numpy as np

        self.gen = self.generator(len(tokens) + self.decode_tokens + 1)  # allocating the KV cache is not timed
        ids = np.array(tokens, dtype=np.int32)
        start = time.perf_counter()
        self.gen.append_tokens(ids)
        processed = time.perf_counter()
        token = self._argmax_last(self.gen)
        return processed - start, time.perf_counter() - start, token

    def time_decode(self, token: int, pos: int, n: int) -> float:
        import numpy as np

        spent = 0.0
        for _ in range(n):
            step = np.array([token], dtype=np.int32)
            start = time.perf_counter()
            self.gen.append_tokens(step)  # one forward pass; onnxruntime-genai's search is not involved
            spent += time.perf_counter() - start
            token = self._argmax_last(self.gen)
        return spent

    def clear(self) -> None:
        self.gen = None

    def close(self) -> None:
        self.gen = None
        del self.model


# ---------------------------------------------------------------------------------------------------------
# Speed
# ---------------------------------------------------------------------------------------------------------

def prompt_tokens(rt, data, n: int) -> list:
    """The first `n` tokens of the bundled text (every corpus, in file order), repeated if it is too short."""
    docs = [d for docs in data[0].values() for d in docs] if data else []
    ids = []
    for doc in docs or [FALLBACK_TEXT]:
        ids.extend(rt.encode(doc))
        if len(ids) >= n:
            break
    if not ids:
        ids = rt.encode(FALLBACK_TEXT)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def measure_speed(rt, data, lengths: list, decode_tokens: int, repeats: int) -> list:
    rows = []
    for p in lengths:
        prompt = prompt_tokens(rt, data, p)
        log(f"  prompt {p} tokens: warm-up + {repeats} runs of prefill and {decode_tokens} decoded tokens")
        prefill_s, ttft_s, decode_s, internal_s = [], [], [], []
        for run in range(repeats + 1):
            processed, first, token = rt.time_prefill(prompt)
            spent = rt.time_decode(token, p, decode_tokens)
            rt.clear()
            if run == 0:
                continue  # warm-up: caches, lazily allocated buffers, CPU frequency
            prefill_s.append(processed)
            ttft_s.append(first)
            decode_s.append(spent)
            internal_s.append(getattr(rt, "internal_s", None))
        row = {
            "prompt_tokens": p,
            "decode_tokens": decode_tokens,
            "ttft_ms": round(1000 * statistics.median(ttft_s), 3),
            "prefill_tok_s": round(p / statistics.median(prefill_s), 2),
            "decode_tok_s": round(decode_tokens / statistics.median(decode_s), 2),
            "runs": {"prefill_s": [round(x, 6) for x in prefill_s], "ttft_s": [round(x, 6) for x in ttft_s],
                     "decode_s": [round(x, 6) for x in decode_s]},
        }
        if all(x for x in internal_s):  # llama.cpp's perf counters: decode time without the Python calls
            row["decode_tok_s_runtime_clock"] = round(decode_tokens / statistics.median(internal_s), 2)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench.py", description="Benchmark an edgeconv bundle on this device: verify, then load time, memory, "
        "speed and accuracy; writes results.json.")
    p.add_argument("--bundle", type=Path, default=None, help="bundle directory (default: the one holding bench.py)")
    p.add_argument("--model", type=Path, default=None,
                   help="a .gguf file or an onnxruntime-genai directory (default: the manifest's model)")
    p.add_argument("--data", type=Path, default=None, help="evaluation data directory (default: BUNDLE/eval)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the manifest's, else all cores)")
    p.add_argument("--gpu-layers", type=int, default=0, help="llama.cpp layers offloaded to the GPU (-1: all)")
    p.add_argument("--flash-attn", action="store_true", help="llama.cpp flash attention (off by default, as in "
                   "llama-cpp-python)")
    p.add_argument("--context", type=int, default=None, help="context length (default: the manifest's, else 2048)")
    p.add_argument("--prompt-lengths", default="64,256,1024", help="comma-separated prompt lengths in tokens")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens decoded after each prompt")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per prompt length, after one warm-up")
    p.add_argument("--quick", action="store_true", help="fewer evaluation items (2,048 tokens per corpus, 10 per "
                   "skill, 40 multiple-choice items)")
    p.add_argument("--ppl-tokens", type=int, default=None, help="tokens per corpus for perplexity")
    p.add_argument("--window", type=int, default=None, help="perplexity window in tokens")
    p.add_argument("--examples", type=int, default=None, help="examples per skill")
    p.add_argument("--choices", type=int, default=None, help="multiple-choice items")
    p.add_argument("--no-accuracy", action="store_true", help="speed and memory only")
    p.add_argument("--no-speed", action="store_true", help="accuracy only")
    p.add_argument("--label", default=None, help="name of this run in reports (default: the bundle's name)")
    p.add_argument("--role", default=None, choices=["student", "teacher"], help="default: the manifest's, else student")
    p.add_argument("--target", default=None, help="target profile name (default: the manifest's)")
    p.add_argument("--out", type=Path, default=None, help="results file (default: BUNDLE/results.json)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle's files")
    return p


def _lengths(text: str) -> list:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise BenchError("--prompt-lengths takes comma-separated integers, like 64,256,1024")
    if not values or values[0] < 1:
        raise BenchError("--prompt-lengths needs positive lengths, like 64,256,1024")
    return values


def _model_path(bundle: Path, manifest, model) -> Path:
    if model is not None:
        return Path(model)
    if manifest and manifest.get("model"):
        # checked even under --no-verify: the manifest names a model inside its bundle, nothing else
        if not isinstance(manifest["model"], str) or unsafe_path(manifest["model"]) or \
                not _inside(bundle.resolve(), manifest["model"]):
            raise RefusedError("model {} in manifest.json is not a path inside the bundle".format(manifest["model"]))
        return bundle / manifest["model"]
    ggufs = sorted(bundle.glob("*.gguf"))
    genai = sorted(p.parent for p in bundle.glob("*/genai_config.json"))
    found = ggufs + genai
    if len(found) == 1:
        return found[0]
    where = bundle / MANIFEST if manifest else bundle
    raise BenchError(f"no model given and {where} does not name one; pass --model FILE.gguf or an "
                     "onnxruntime-genai directory")


def _format(path: Path, manifest, explicit_model: bool) -> str:
    if not explicit_model and manifest and manifest.get("format"):
        return manifest["format"]
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir() and (path / "genai_config.json").is_file():
        return "onnx-genai"
    raise BenchError(f"{path} is neither a .gguf file nor an onnxruntime-genai directory (genai_config.json)")


def _bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _r(x, nd=1):
    return None if x is None else round(x, nd)


def run(args=None) -> dict:
    """Run the benchmark; `args` is an argparse namespace, a list of command-line strings or None (sys.argv).
    Raises RefusedError when the bundle does not verify, BenchError on other problems the user can fix."""
    if not isinstance(args, argparse.Namespace):
        args = parser().parse_args(args)
    started = datetime.datetime.now(datetime.timezone.utc)
    clock = time.time()
    bundle = Path(args.bundle) if args.bundle else Path(__file__).resolve().parent
    try:
        manifest = load_manifest(bundle)
    except RefusedError as exc:
        raise RefusedError(f"{exc}; re-copy the bundle")
    notes = []

    # 1. Verify first: a bundle that does not match its manifest is refused before anything is loaded.
    # What remains: someone who can write the bundle while this runs could swap a file between this check and
    # its use; and someone who can rewrite manifest.json too defeats it (edgeconv bench --expect-sha256 is for that).
    verified = None
    hashed = set()
    if args.no_verify:
        notes.append("--no-verify: the bundle's files were not checked")
    elif manifest is None and args.model is not None:
        notes.append(f"no manifest.json in {bundle}: nothing to verify")
    else:
        if manifest is None:
            raise RefusedError(f"{bundle} has no manifest.json (pass --model to benchmark a model outside a bundle)")
        log(f"verifying {len(manifest.get('files') or {})} files against manifest.json ...")
        problems = verify_bundle(bundle)
        if problems:
            more = ""
            if len(problems) > 1:
                more = " (and {} more problem{})".format(len(problems) - 1, "s" * (len(problems) > 2))
            raise RefusedError(f"{problems[0]}{more}; re-copy the bundle")
        verified = True
        hashed = hashed_files(bundle, manifest)
    manifest = manifest or {}

    model = _model_path(bundle, manifest, args.model)
    if not model.exists():
        raise BenchError(f"{model} does not exist")
    fmt = _format(model, manifest, args.model is not None)
    capped_from = None  # the bundle's thread count when this machine has fewer usable cores
    if args.threads is None:
        args.threads, wanted = default_threads(manifest)
        if wanted != args.threads:
            capped_from = wanted
            log("the bundle asks for {} threads but only {} cores are usable here: using {} (--threads overrides)"
                .format(wanted, args.threads, args.threads))
    if args.context is None:
        args.context = int(manifest.get("context") or 2048)
    lengths = _lengths(args.prompt_lengths)
    quick = QUICK if args.quick else FULL
    settings = {"tokens": args.ppl_tokens or quick["tokens"], "window": args.window or quick["window"],
                "examples": args.examples or quick["examples"], "choices": args.choices or quick["choices"],
                "max_new": quick["max_new"], "quick": bool(args.quick)}
    data_dir = Path(args.data) if args.data else bundle / "eval"
    data = load_eval_data(data_dir)
    if data is None:
        notes.append(f"no evaluation data in {data_dir}: accuracy not measured, speed prompts from a built-in text")
    if verified:
        # "verified": true claims every file this run reads matched the manifest, not only that the bundle did
        unhashed = [p for p in files_read(model, data_dir, data) if p.resolve() not in hashed]
        if unhashed:
            verified = False
            notes.append("not verified: {} file{} read here {} not among manifest.json's hashed files ({}{})".format(
                len(unhashed), "s" * (len(unhashed) > 1), "are" if len(unhashed) > 1 else "is",
                ", ".join(str(p) for p in unhashed[:3]), ", ..." if len(unhashed) > 3 else ""))

    # 2. Load, timed, with the RSS before and after.
    rss_before = rss_mb()
    log(f"loading {model.name} ({fmt}, {args.threads} threads, context {args.context}) ...")
    start = time.perf_counter()
    if fmt == "gguf":
        rt = LlamaCpp(model, args)
    elif fmt == "onnx-genai":
        rt = Genai(model, args)
        if args.gpu_layers:
            notes.append("--gpu-layers applies to llama.cpp only; onnxruntime-genai uses the providers of "
                         "genai_config.json")
        if args.flash_attn:
            notes.append("--flash-attn applies to llama.cpp only")
    else:
        raise BenchError(f"unknown model format {fmt!r} (gguf or onnx-genai)")
    load_s = time.perf_counter() - start
    rss_after_load = rss_mb()
    # onnxruntime-genai sizes its KV cache per generator, up to the model's context_length
    context = args.context if fmt == "gguf" else rt.context

    speed, peak_speed = [], None
    accuracy_result = None
    try:
        model_info = rt.describe()
        # 3. Speed: prompt lengths that leave room for the decoded tokens in the context (and the model's own).
        limit = args.context - args.decode_tokens
        if fmt == "onnx-genai":
            limit = min(limit, rt.context - args.decode_tokens - 1)
        trained = rt.n_ctx_train()
        usable = min(context, trained or context)  # beyond its trained context a model is not tested
        limit = min(limit, usable - args.decode_tokens)
        skipped = [p for p in lengths if p > limit]
        lengths = [p for p in lengths if p <= limit]
        if skipped:
            why = "the context" if usable == context else "the model's trained context"
            notes.append("prompt lengths {} skipped: longer than {} ({}) minus {} decoded tokens".format(
                ",".join(map(str, skipped)), why, usable, args.decode_tokens))
        if not args.no_speed and lengths:
            log("speed:")
            speed = measure_speed(rt, data, lengths, args.decode_tokens, max(1, args.repeats))
        peak_speed = peak_rss_mb()  # load + speed: what running the model takes, before the scoring context

        # 4. Accuracy on the bundled data.
        if data is not None and not args.no_accuracy:
            log("accuracy ({}):".format("quick" if args.quick else "full"))
            if fmt == "gguf":
                # One model in memory at a time: close the speed context, load again with logits for every position.
                rt.close()
                rt = None
                sc = LlamaCppScorer(_quiet_llama_cpp(), model, args.threads, args.gpu_layers,
                                    max(SCORING_CONTEXT, settings["window"]), args.flash_attn)
            else:
                sc = GenaiScorer(rt)
            try:
                accuracy_result = accuracy(sc, data, settings)
            finally:
                sc.close()
            if fmt == "onnx-genai":
                notes.append("onnx-genai exact match decodes incrementally with the KV cache; edgeconv's own "
                             "evaluation recomputes the whole sequence per token (rare near-ties may differ)")
    finally:
        if rt is not None:
            rt.close()

    quant = manifest.get("quant") or model_info.get("file_type")
    result = {
        "schema": SCHEMA,
        "label": args.label or manifest.get("name") or model.stem,
        "role": args.role or manifest.get("role") or "student",
        "target": args.target or manifest.get("target"),
        "bundle": str(bundle) if manifest else None,
        "verified": verified,
        "model": {"path": str(model), "format": fmt, "bytes": _bytes(model), "quant": quant, **model_info},
        "device": device_info(),
        "runtime": {"name": rt_name(fmt), "version": runtime_version(fmt), "threads": args.threads,
                    "threads_capped_from": capped_from,
                    "gpu_layers": args.gpu_layers if fmt == "gguf" else None, "context": context,
                    "flash_attn": bool(args.flash_attn) if fmt == "gguf" else None},
        "load_s": round(load_s, 3),
        "rss_before_load_mb": _r(rss_before),
        "rss_after_load_mb": _r(rss_after_load),
        "peak_rss_mb": _r(peak_speed),
        "peak_rss_with_scoring_mb": _r(peak_rss_mb()),
        "speed": speed,
        "decode_tok_s": speed[0]["decode_tok_s"] if speed else None,
        "accuracy": accuracy_result,
        "notes": notes,
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(time.time() - clock, 1),
    }
    out = Path(args.out) if args.out else bundle / "results.json"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise BenchError(f"cannot write {out} ({exc.strerror or exc}); pass --out")
    result["out"] = str(out)
    return result


def rt_name(fmt: str) -> str:
    return "llama.cpp" if fmt == "gguf" else "onnxruntime-genai"


def runtime_version(fmt: str):
    try:
        if fmt == "gguf":
            import llama_cpp
            return "llama-cpp-python " + getattr(llama_cpp, "__version__", "?")
        import onnxruntime_genai
        return "onnxruntime-genai " + getattr(onnxruntime_genai, "__version__", "?")
    except ImportError:
        return None


def power_text(device: dict) -> str:
    """"nvpmodel MAXN (0), jetson_clocks on", or "" where neither tool was there."""
    parts = []
    nvp, clocks = device.get("nvpmodel"), device.get("jetson_clocks")
    if nvp:
        parts.append("nvpmodel {}{}".format(nvp.get("mode") or "unknown",
                                            " ({})".format(nvp["id"]) if nvp.get("id") is not None else ""))
    if clocks:
        parts.append("jetson_clocks " + {True: "on", False: "off"}.get(clocks.get("on"), "unknown"))
    return ", ".join(parts)


def summary(r: dict) -> str:
    lines = ["{} ({}, {}) on {} {}".format(r["label"], r["role"], r["model"]["format"],
                                          r["device"]["processor"] or r["device"]["machine"],
                                          "target " + r["target"] if r["target"] else ""),
             "  model      {} ({:.1f} MB{})".format(Path(r["model"]["path"]).name, r["model"]["bytes"] / 1e6,
                                                    ", " + r["model"]["quant"] if r["model"]["quant"] else ""),
             "  runtime    {}, {} threads, context {}".format(r["runtime"]["version"], r["runtime"]["threads"],
                                                            r["runtime"]["context"]),
             "  load       {:.2f} s, RSS after load {} MB, peak RSS {} MB".format(
                 r["load_s"], r["rss_after_load_mb"], r["peak_rss_mb"])]
    power = power_text(r["device"])
    if power:
        lines.append("  power      " + power)
    for s in r["speed"]:
        lines.append("  prompt {:>5}  TTFT {:8.1f} ms  prefill {:9.1f} tok/s  decode {:8.1f} tok/s".format(
            s["prompt_tokens"], s["ttft_ms"], s["prefill_tok_s"], s["decode_tok_s"]))
    a = r["accuracy"]
    if a:
        ppl = ", ".join(f"{c} {v:.2f}" for c, v in a["perplexity"].items() if v is not None)
        lines.append(f"  perplexity {ppl}")
        if a["exact_match_mean"] is not None:
            lines.append("  exact match {:.1f} % mean ({})".format(100 * a["exact_match_mean"], ", ".join(
                f"{k} {100 * v:.0f} %" for k, v in a["exact_match"].items())))
        if a["choice_acc"] is not None:
            lines.append("  multiple choice acc {:.1f} %, acc_norm {:.1f} % ({} items)".format(
                100 * a["choice_acc"], 100 * a["choice_acc_norm"], a["settings"]["choice_items"]))
    for note in r["notes"]:
        lines.append("  note: " + note)
    lines.append("  wrote {} ({:.0f} s)".format(r.get("out"), r["seconds"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    try:
        result = run(parser().parse_args(argv))
    except RefusedError as exc:
        print(f"bench.py: refusing to run: {exc}", file=sys.stderr)
        return 2
    except BenchError as exc:
        print(f"bench.py: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"bench.py: error: {exc} (install llama-cpp-python for a .gguf model, onnxruntime-genai for an ONNX "
              "directory)", file=sys.stderr)
        return 2
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
