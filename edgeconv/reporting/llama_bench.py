"""llama.cpp's `llama-bench -o json` (or `-o jsonl`) output as edgeconv-bench/1 results, so `edgeconv report` puts
llama-bench's figures in the same tables and plots as bench.py's.

A llama-bench file holds one record per test: `pp512` (prefill: a 512-token prompt in one batch), `tg128` (decode:
128 tokens one at a time from an empty cache), each with its mean tokens/s over repetitions and their standard
deviation. Records of one configuration (same model, threads, GPU layers, batch, ...) make one result: its
prefill is the pp test, its decode the tg test at the same depth. llama-bench measures neither memory nor
accuracy; bench.sh (and `edgeconv bench --adb`) write `NAME.edgeconv.json` next to NAME.json with what it does not
record: the bundle's name and target, the device (on a Jetson its power mode and jetson_clocks), and the
perplexities llama-perplexity measured on the bundle's eval text.
"""

from __future__ import annotations

import json
from pathlib import Path

SCHEMA = "edgeconv-bench/1"
SIDECAR_SCHEMA = "edgeconv-llama-bench/1"
# The fields that describe one test rather than the configuration it ran with.
PER_TEST = {"n_prompt", "n_gen", "n_depth", "test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts", "samples_ns",
            "samples_ts"}


def records(text: str) -> list[dict] | None:
    """llama-bench's records from a file's text (a JSON array, one object, or JSON lines); None if it is not
    llama-bench output."""
    try:
        data = json.loads(text)
    except ValueError:
        data = []
        for line in text.splitlines():
            if line.strip():
                try:
                    data.append(json.loads(line))
                except ValueError:
                    return None
    if isinstance(data, dict):
        data = [data]
    if isinstance(data, list) and data and all(isinstance(r, dict) and _is_test(r) for r in data):
        return data
    return None


def _is_test(r: dict) -> bool:
    return {"avg_ts", "n_prompt", "n_gen"} <= set(r) and "schema" not in r


def test_name(r: dict) -> str:
    """llama-bench's own name of a test: pp512, tg128, pp512+tg128, with `@ dN` for a depth."""
    p, g, d = int(r.get("n_prompt") or 0), int(r.get("n_gen") or 0), int(r.get("n_depth") or 0)
    name = f"pp{p}" if not g else f"tg{g}" if not p else f"pp{p}+tg{g}"
    return name + (f" @ d{d}" if d else "")


def sidecar_path(path: Path) -> Path:
    """llama-bench.json -> llama-bench.edgeconv.json (what bench.sh writes beside it)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.edgeconv.json")


def read_sidecar(path: Path) -> dict:
    """The NAME.edgeconv.json beside a llama-bench file, when it is one bench.sh wrote; {} otherwise."""
    side = sidecar_path(path)
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) and data.get("schema") == SIDECAR_SCHEMA else {}


def parse_perplexity(text: str) -> float | None:
    """The `Final estimate: PPL = X +/- Y` of a llama-perplexity log; None when it has none."""
    value = None
    for line in text.splitlines():
        if "Final estimate: PPL = " in line:
            try:
                value = float(line.split("Final estimate: PPL = ", 1)[1].split()[0])
            except (IndexError, ValueError):
                value = None
    return value


def to_results(recs: list[dict], path: Path) -> list[dict]:
    """One edgeconv-bench/1 result dict per configuration in RECS (usually one), completed from the sidecar."""
    side = read_sidecar(path)
    groups: dict[str, list[dict]] = {}
    for r in recs:
        key = json.dumps({k: v for k, v in r.items() if k not in PER_TEST}, sort_keys=True, default=str)
        groups.setdefault(key, []).append(r)
    out = []
    for group in groups.values():
        result = _result(group, path, side)
        if len(groups) > 1:  # several models or thread counts in one file: tell them apart
            first = group[0]
            what = [Path(str(first.get("model_filename", ""))).name, f"{first.get('n_threads')} thr"]
            if first.get("n_gpu_layers") and first.get("gpu_info"):
                what.append(f"ngl {first['n_gpu_layers']}")
            result["label"] += f" [{', '.join(what)}]"
        out.append(result)
    return out


def _result(group: list[dict], path: Path, side: dict) -> dict:
    first = group[0]
    model_file = str(first.get("model_filename") or "")
    side_model = side.get("model") if isinstance(side.get("model"), dict) else {}
    same_model = not side_model.get("path") or Path(model_file).name == Path(str(side_model["path"])).name
    tests = [{"test": test_name(r), "n_prompt": r.get("n_prompt"), "n_gen": r.get("n_gen"),
              "n_depth": r.get("n_depth", 0), "avg_ts": r.get("avg_ts"), "stddev_ts": r.get("stddev_ts")}
             for r in group]
    speed = _speed(group)
    decode = next((s["decode_tok_s"] for s in speed if s.get("decode_tok_s") is not None), None)
    device = dict(side.get("device") or {})
    device.setdefault("processor", first.get("cpu_info") or None)
    if not device.get("gpu") and first.get("gpu_info"):
        device["gpu"] = [str(first["gpu_info"])]
    perplexity = {f"{corpus} (llama-perplexity)": v for corpus, v in (side.get("perplexity") or {}).items()}
    settings = side.get("perplexity_settings") or {}
    notes = ["llama-bench: " + ", ".join(f"{t['test']} {t['avg_ts']:,.1f} ± {t['stddev_ts'] or 0:,.1f} tok/s"
                                         for t in tests if t["avg_ts"] is not None)]
    if perplexity:
        notes.append("perplexity by llama-perplexity (-c {}, {} chunks; it scores the second half of each chunk): "
                     "not bench.py's method, so it has its own columns".format(settings.get("context", 512),
                                                                               settings.get("chunks", "all")))
    notes += [str(n) for n in side.get("notes") or []]
    build = first.get("build_commit")
    return {
        "schema": SCHEMA,
        "label": str(side.get("label") or Path(model_file).stem or path.stem),
        "role": str(side.get("role") or "student"),
        "target": side.get("target"),
        "bundle": side.get("bundle"),
        "verified": side.get("verified"),
        "model": {"path": model_file, "format": "gguf",  # the file's size from bench.sh, else llama-bench's tensors'
                  "bytes": (side_model.get("bytes") if same_model else None) or first.get("model_size"),
                  "quant": (side_model.get("quant") if same_model else None) or _quant(first.get("model_type"))},
        "device": device,
        "runtime": {"name": "llama.cpp (llama-bench)",
                    "version": f"llama.cpp build {first.get('build_number')} ({build})" if build else None,
                    "threads": first.get("n_threads"), "context": None,
                    # a CPU-only build records its default (-1 or 99) though nothing is offloaded
                    "gpu_layers": first.get("n_gpu_layers") if first.get("gpu_info") else None,
                    "flash_attn": first.get("flash_attn"), "backends": first.get("backends")},
        "load_s": None, "rss_after_load_mb": None, "peak_rss_mb": None,
        "speed": speed,
        "decode_tok_s": decode,
        "accuracy": {"perplexity": perplexity, "exact_match": {}, "exact_match_mean": None, "choice_acc": None,
                     "choice_acc_norm": None, "settings": {"runtime": "llama-perplexity", **settings}}
        if perplexity else None,
        "llama_bench": tests,
        "notes": notes,
        "started": side.get("started") or first.get("test_time"),
        "seconds": side.get("seconds"),
    }


def _speed(group: list[dict]) -> list[dict]:
    """bench.py's speed rows from llama-bench's tests: a pp test gives a row's prefill (at its prompt length), the
    tg test at the same depth its decode (llama-bench decodes from the depth, not after the prompt); a tg test
    with no pp test at its depth gets a row of its own, at prompt length = depth."""
    pp = sorted((r for r in group if r.get("n_prompt") and not r.get("n_gen")), key=lambda r: r["n_prompt"])
    tg = [r for r in group if r.get("n_gen") and not r.get("n_prompt")]
    rows, used = [], set()
    for r in pp:
        depth = int(r.get("n_depth") or 0)
        row = {"prompt_tokens": int(r["n_prompt"]), "ttft_ms": None, "prefill_tok_s": r.get("avg_ts"),
               "decode_tok_s": None, "depth": depth}
        match = next((t for t in tg if int(t.get("n_depth") or 0) == depth and id(t) not in used), None)
        if match is not None:
            used.add(id(match))
            row.update(decode_tok_s=match.get("avg_ts"), decode_tokens=match.get("n_gen"))
        rows.append(row)
    for t in tg:
        if id(t) not in used:
            rows.append({"prompt_tokens": int(t.get("n_depth") or 0), "ttft_ms": None, "prefill_tok_s": None,
                         "decode_tok_s": t.get("avg_ts"), "decode_tokens": t.get("n_gen"),
                         "depth": int(t.get("n_depth") or 0)})
    return sorted(rows, key=lambda s: s["prompt_tokens"])


def _quant(model_type) -> str | None:
    """The file type in llama-bench's model_type ("qwen3 0.6B Q4_K - Medium" -> "Q4_K - Medium")."""
    parts = str(model_type or "").split(" ", 2)
    return parts[2] if len(parts) == 3 else None
