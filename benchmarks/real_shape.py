"""What edgeconv costs at the real size of released MoEs, next to llama.cpp's own converter (issue 18).

Random-weight checkpoints with the exact shapes of Qwen3-30B-A3B, OLMoE-1B-7B-0924, Mixtral-8x7B, Qwen1.5-MoE-A2.7B,
DeepSeek-V2-Lite and GPT-OSS-20B (configs typed from their published config.json: real_shape_models.py), cut to
--layers N, with the shipped demo tokenizer's 4,096-token vocabulary. Then every stage runs as its own process,
measured (wall time, exact peak RSS: benchmarks/measure.py), and the rows go to results/real_shape.{json,md}:

  convert         edgeconv convert CKPT --out student (defaults: 65,536 calibration tokens of the demo text)
  export-teacher  edgeconv export CKPT --quant F16 | Q8_0 (--teacher-quants)
  export-student  edgeconv export student --quant F16 | Q8_0 | Q4_K_M (--student-quants)
  upstream        llama.cpp's convert_hf_to_gguf.py --outtype f16 | q8_0 on the same checkpoints, llama-quantize
                  f16 -> Q4_K_M; then every GGUF both made is compared tensor by tensor (type, shape, sha256 of the
                  bytes) and the metadata key by key
  cache           edgeconv distill --mode offline --cache-only (teacher top-k cache of --distill-tokens tokens)
  distill         edgeconv distill --mode offline (the same tokens, from that cache)
  bench           llama-bench -p 512 -n 128 -t 1,2 and llama-batched-bench (16 parallel sequences) on the
                  teacher's and the student's --bench-quants GGUFs
  build           (issue 21) edgeconv build CKPT --target jetson --distill-tokens 0

    python benchmarks/real_shape.py list
    python benchmarks/real_shape.py write olmoe --layers 1                     # -> benchmarks/_work/real_shape/...
    python benchmarks/real_shape.py check benchmarks/_work/real_shape/olmoe-1b-7b-L1/teacher --forward
    python benchmarks/real_shape.py run qwen3 --layers 24 --stages convert,export-teacher,export-student,upstream
    python benchmarks/real_shape.py render

A stage whose row is in the results is skipped unless --redo. GGUFs are digested (sha256 per tensor) as soon as
they are written and then deleted, except the --bench-quants ones (and all with --keep), so ours and upstream's
never need to be on disk together. The llama.cpp programs are built on first use (benchmarks/llama_cpp_tools.py).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp_tools  # noqa: E402
import real_shape_models as models  # noqa: E402
from measure import busy_cpu_s, edgeconv_command, measured  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "_work" / "real_shape"
RESULTS = ROOT / "benchmarks" / "results" / "real_shape.json"
TINY_RESULTS = WORK / "tiny-results.json"  # --tiny runs (debugging the harness) never go to results/
DISTILL_DATA = ROOT / "edgeconv" / "assets" / "distill.jsonl"
STAGES = ["convert", "export-teacher", "export-student", "upstream", "cache", "distill", "bench", "build"]
DEFAULT_STAGES = "convert,export-teacher,export-student,upstream,cache,distill,bench"
UPSTREAM_TYPES = {"F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}  # convert_hf_to_gguf.py --outtype; Q4_K_M: quantize
BYTES_PER_PARAM = {"F16": 2.0, "BF16": 2.0, "F32": 4.0, "Q8_0": 34 / 32, "Q4_K_M": 0.62}
# edgeconv writes these in one pass; the others go through a BF16 file to llama.cpp's quantizer (Q8_0 since ed997dd)
WRITTEN_DIRECTLY = ("F16", "BF16", "F32", "Q8_0")
GB = 1e9


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rel(p) -> str:
    s = str(p)
    return s.replace(str(ROOT) + "/", "")


def edgeconv_commit() -> str:
    def git(*a):
        return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--", "edgeconv")
    return commit + ("+dirty" if dirty else "")


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# GGUF digests: what "byte-identical to upstream" is checked on (files can be deleted once digested)
# ---------------------------------------------------------------------------------------------------------------


def digest_gguf(path: Path) -> dict:
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)
    tensors = {}
    for t in reader.tensors:
        data = np.ascontiguousarray(t.data).view(np.uint8)
        h = hashlib.sha256()
        step = 1 << 26
        flat = data.reshape(-1)
        for i in range(0, flat.size, step):
            h.update(flat[i:i + step])
        tensors[t.name] = {"type": t.tensor_type.name, "shape": [int(x) for x in t.shape],
                           "nbytes": int(t.n_bytes), "sha256": h.hexdigest()}
    kv = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                                "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            if name.startswith("tokenizer.ggml."):  # long arrays: a hash of the contents
                kv[name] = "sha256:" + hashlib.sha256(repr(field.contents()).encode()).hexdigest()[:16]
            continue
        try:
            value = field.contents()
        except Exception:  # noqa: BLE001 (an unreadable field is reported as such)
            value = "<unreadable>"
        if isinstance(value, list) and len(value) > 64:
            value = "sha256:" + hashlib.sha256(repr(value).encode()).hexdigest()[:16]
        kv[name] = value
    return {"file": path.name, "bytes": path.stat().st_size, "tensors": tensors, "kv": kv}


def compare_digests(ours: dict, theirs: dict) -> dict:
    a, b = ours["tensors"], theirs["tensors"]

    def dims(shape: list) -> list:  # llama-quantize writes ggml_n_dims: a trailing 1 (one expert) is dropped
        shape = list(shape)
        while len(shape) > 1 and shape[-1] == 1:
            shape.pop()
        return shape

    same, differ, trailing = [], [], []
    for n in a:
        if n not in b:
            continue
        x, y = a[n], b[n]
        what = [k for k in ("type", "sha256") if x[k] != y[k]]
        if dims(x["shape"]) != dims(y["shape"]):
            what.append("shape")
        elif x["shape"] != y["shape"]:
            trailing.append(n)
        if what:
            differ.append({"name": n, "differs_in": what, "ours": {k: x[k] for k in ("type", "shape")},
                           "upstream": {k: y[k] for k in ("type", "shape")}})
        else:
            same.append(n)
    kv_keys = sorted(set(ours["kv"]) | set(theirs["kv"]))
    kv_diff = {k: {"ours": ours["kv"].get(k, "<absent>"), "upstream": theirs["kv"].get(k, "<absent>")}
               for k in kv_keys if ours["kv"].get(k, "<absent>") != theirs["kv"].get(k, "<absent>")}
    return {
        "identical_tensors": len(same), "tensors_ours": len(a), "tensors_upstream": len(b),
        "all_tensors_identical": not differ and set(a) == set(b),
        "differing": differ, "same_bytes_shape_differs_by_trailing_1": trailing,
        "only_ours": sorted(set(a) - set(b)), "only_upstream": sorted(set(b) - set(a)),
        "bytes_ours": ours["bytes"], "bytes_upstream": theirs["bytes"], "metadata_differences": kv_diff,
    }


# ---------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------


def load_results(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"about": "benchmarks/real_shape.py: edgeconv at the shapes of released MoEs vs llama.cpp's converter",
            "rows": []}


def save_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    results["rows"].sort(key=lambda r: (r["tag"], STAGES.index(r["stage"]) if r["stage"] in STAGES else 99))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    tmp.replace(path)
    path.with_suffix(".md").write_text(render(results))


def fmt_gb(n) -> str:
    return "-" if n is None else f"{n / GB:,.2f}"


def fmt_s(x) -> str:
    return "-" if x is None else f"{x:,.1f}"


def row_result(r: dict) -> str:
    x = r.get("extra") or {}
    if not r.get("ok", True):
        return f"FAILED (rc {r.get('returncode')})"
    if r["step"] == "build" and "summary" in x:
        s, p = x["summary"], x.get("parity") or {}
        return (f"planned weights {fmt_gb(s.get('planned_weights_bytes'))} GB "
                f"(total {fmt_gb(s.get('planned_total_bytes'))}), written {fmt_gb(s.get('written_model_bytes'))} GB "
                f"{s.get('quant')}; ppl ratio {p.get('ppl_ratio', float('nan')):.4f}, "
                f"top-1 {p.get('top1_agreement') or 0:.1%}")
    if "parity" in x:
        p, d = x["parity"], x.get("parity_depth") or {}
        cut = f" (parity on {d['layers']} of {d['of']} layers)" if d and d.get("layers", 0) < d.get("of", 0) else ""
        return f"ppl ratio {p.get('ppl_ratio', float('nan')):.4f}, top-1 {p.get('top1_agreement', 0):.1%}{cut}"
    if "all_tensors_identical" in x:
        note = (f" ({len(x['same_bytes_shape_differs_by_trailing_1'])} written with a trailing 1-dim dropped)"
                if x.get("same_bytes_shape_differs_by_trailing_1") else "")
        if x["all_tensors_identical"]:
            return f"all {x['identical_tensors']} tensors byte-identical{note}"
        names = [d["name"] for d in x["differing"]][:4] + x["only_ours"][:2] + x["only_upstream"][:2]
        return (f"{x['identical_tensors']}/{max(x['tensors_ours'], x['tensors_upstream'])} identical; "
                f"differ: {', '.join(names)}{' ...' if len(x['differing']) > 4 else ''}")
    if "llama_bench" in x:
        return "; ".join(f"t{t['threads']} pp{t['n_prompt']} {t['pp_ts']:,.1f} tg{t['n_gen']} {t['tg_ts']:,.1f} tok/s"
                         for t in x["llama_bench"])
    if "batched" in x:
        return "; ".join(f"npl {b.get('pl')}: S_TG {b.get('speed_tg', 0):,.1f} tok/s, S {b.get('speed', 0):,.1f}"
                         for b in x["batched"])
    if "summary" in x:
        options = f"{x['options']}: " if x.get("options") else ""
        return options + ", ".join(f"{k} {v}" for k, v in x["summary"].items())
    return ""


def builds_table(rows: list[dict]) -> list[str]:
    """Issue 21: one line per `edgeconv build --target jetson --distill-tokens 0` run, every family side by side."""
    out = []
    for r in rows:
        if r["stage"] != "build":
            continue
        x = r.get("extra") or {}
        s, p = x.get("summary") or {}, x.get("parity") or {}
        # the tag names a teacher written with a realistic logit scale: -ls<logit scale>-up<unigram prior>
        teacher = ", ".join(f"{what} {m.group(1)}" for what, key in (("unigram prior", "up"), ("logit scale", "ls"))
                            if (m := re.search(rf"-{key}([0-9.]+)", r["tag"])))
        planned, written = s.get("planned_weights_bytes"), s.get("written_model_bytes")
        size = (f"{planned / 1e6:,.1f} / {written / 1e6:,.1f} MB ({written / planned - 1:+.2%})"
                if planned and written else "-")
        if r.get("ok", True) and p:
            outcome = f"{s.get('quant')} parity ppl ratio {p['ppl_ratio']:.4f}, top-1 {p['top1_agreement']:.1%}"
        else:
            tail = (r.get("output_tail") or "").strip().splitlines()
            why = tail[-1].removeprefix("error: ").split("; ")[0] if tail else f"rc {r.get('returncode')}"
            outcome = f"FAILED: {why}"
        layers = f"{r['layers']}" + (f", {r['experts']} experts" if r.get("experts") else "")
        params = f"{s['dense_params'] / 1e6:,.1f} M" if s.get("dense_params") else "-"
        out.append(f"| {r['shape']} | {layers} | {teacher or 'plain'} | {fmt_gb(r.get('checkpoint_bytes'))} | "
                   f"{params} | {size} | {outcome} | {fmt_s(r.get('wall_s'))} | "
                   f"{fmt_gb(r.get('peak_rss_bytes'))} | {r.get('edgeconv_commit', '')} |")
    if not out:
        return []
    return ["## `edgeconv build CKPT --target jetson --distill-tokens 0`, every family", "",
            "| shape | layers | random teacher | checkpoint GB | student params | planned / written GGUF weights | "
            "parity | wall s | peak RSS GB | edgeconv |", "|---|---|---|---|---|---|---|---|---|---|", *out, ""]


def render(results: dict) -> str:
    lines = ["# Real-shape benchmark (benchmarks/real_shape.py)", "",
             "Random-weight checkpoints with the exact shapes of released MoEs (configs typed from their published "
             "config.json), cut to N layers, 4,096-token demo vocabulary. Wall time and peak RSS of each command, "
             "one process each (`benchmarks/measure.py`).", ""]
    lines += builds_table(results["rows"])
    tags = []
    for r in results["rows"]:
        if r["tag"] not in tags:
            tags.append(r["tag"])
    for tag in tags:
        rows = [r for r in results["rows"] if r["tag"] == tag]
        r0 = rows[0]
        lines += [f"## {r0['shape']} ({r0['hub']}), {r0['layers']} layers"
                  + (f", {r0['experts']} experts" if r0.get("experts") else "")
                  + (" (tiny widths: harness test)" if r0.get("tiny") else ""), "",
                  f"checkpoint {fmt_gb(r0.get('checkpoint_bytes'))} GB, {r0.get('checkpoint_params', 0) / 1e9:.3f} B "
                  f"params; machine {r0.get('machine', {}).get('cpus')} CPUs, {r0.get('machine', {}).get('ram_gb')} GB",
                  "", "| step | wall s | peak RSS GB | output GB | result | edgeconv | date |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['step']} | {fmt_s(r.get('wall_s'))} | {fmt_gb(r.get('peak_rss_bytes'))} | "
                         f"{fmt_gb(r.get('artifact_bytes'))} | {row_result(r)} | {r.get('edgeconv_commit', '')} | "
                         f"{r.get('date', '')[:10]} |")
        lines += [""] + comparison_lines(rows) + bench_lines(rows)
    return "\n".join(lines) + "\n"


def _by_step(rows: list[dict]) -> dict:
    return {r["step"]: r for r in rows if r.get("ok", True)}


def comparison_lines(rows: list[dict]) -> list[str]:
    """edgeconv export vs convert_hf_to_gguf.py (+ llama-quantize), per model and type: the goal ratios."""
    s = _by_step(rows)
    out = []
    for model in ("teacher", "student"):
        for quant in ("F16", "Q8_0", "Q4_K_M"):
            ours = s.get(f"export-{model}-{quant}")
            if quant == "Q4_K_M":
                b = s.get(f"upstream-{model}-Q4_K_M")
                base = ((b or {}).get("extra") or {}).get("base", "F16")
                a = s.get(f"upstream-{model}-{base}")
                up = None if not (a and b) else {"wall_s": a["wall_s"] + b["wall_s"],
                                                  "peak_rss_bytes": max(a["peak_rss_bytes"], b["peak_rss_bytes"])}
                how = f"convert {base.lower()} + llama-quantize"
            else:
                up, how = s.get(f"upstream-{model}-{quant}"), f"convert --outtype {UPSTREAM_TYPES[quant]}"
            if not (ours and up):
                continue
            cmp_row = s.get(f"compare-{model}-{quant}")
            ident = row_result(cmp_row) if cmp_row else "-"
            out.append(f"| {model} {quant} | {ours['wall_s']:,.1f} / {up['wall_s']:,.1f} = "
                       f"**{ours['wall_s'] / up['wall_s']:.2f}** | {fmt_gb(ours['peak_rss_bytes'])} / "
                       f"{fmt_gb(up['peak_rss_bytes'])} = **{ours['peak_rss_bytes'] / up['peak_rss_bytes']:.2f}** | "
                       f"{how} | {ident} |")
    if not out:
        return []
    return ["edgeconv export vs llama.cpp (goal: wall and peak RSS <= 1.5x; F16/Q8_0 tensors byte-identical):", "",
            "| GGUF | wall s, ours / upstream | peak RSS GB, ours / upstream | upstream recipe | tensors |",
            "|---|---|---|---|---|", *out, ""]


def bench_lines(rows: list[dict]) -> list[str]:
    s = _by_step(rows)
    out = []
    for key, r in s.items():
        if not key.startswith("bench-"):
            continue
        _, model, quant = key.split("-", 2)
        tests = {(t["threads"]): t for t in r["extra"]["llama_bench"]}
        b = s.get(f"batched-{model}-{quant}")
        batched = (b or {}).get("extra", {}).get("batched", [])
        s_tg = next((x.get("speed_tg") for x in batched if x.get("pl") == 16), None)
        cells = []
        for th in (1, 2):
            t = tests.get(th)
            cells += [f"{t['pp_ts']:,.1f}" if t else "-", f"{t['tg_ts']:,.1f}" if t else "-"]
        out.append(f"| {model} {quant} | {fmt_gb(r.get('artifact_bytes'))} | {fmt_gb(r.get('peak_rss_bytes'))} | "
                   + " | ".join(cells) + f" | {'-' if s_tg is None else f'{s_tg:,.1f}'} |")
    if not out:
        return []
    return ["Student vs teacher in llama.cpp (llama-bench pp512 / tg128 tok/s; batched-bench S_TG at 16 sequences):",
            "", "| GGUF | file GB | llama-bench peak RSS GB | pp512 t1 | tg128 t1 | pp512 t2 | tg128 t2 "
            "| batch-16 decode tok/s |",
            "|---|---|---|---|---|---|---|---|", *sorted(out), ""]


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


class Run:
    def __init__(self, args):
        self.args = args
        self.shape = models.resolve(args.shape)
        self.layers = args.layers
        self.experts = args.experts
        self.tiny = args.tiny
        self.fmt = args.gpt_oss_format
        self.overrides = parse_overrides(args.set)
        self.tag = tag_of(self.shape, self.layers, self.experts, self.tiny, self.fmt, args.logit_scale, self.overrides,
                          args.unigram_prior)
        self.work = Path(args.work or WORK / self.tag).absolute()
        self.ckpt = self.work / "teacher"
        self.student = self.work / "student"
        self.gguf = self.work / "gguf"
        self.upstream = self.work / "upstream"
        self.digests = self.work / "digests"
        self.logs = self.work / "logs"
        self.results_path = Path(args.results or (TINY_RESULTS if self.tiny else RESULTS))
        self.results = load_results(self.results_path)
        self.commit = edgeconv_commit()
        self.machine = None
        self.meta = None

    # --- bookkeeping --------------------------------------------------------------------------------------------
    def row(self, step: str) -> dict | None:
        return next((r for r in self.results["rows"] if r["tag"] == self.tag and r["step"] == step
                     and r.get("ok", True)), None)

    def done(self, step: str) -> bool:
        return self.row(step) is not None and not self.args.redo

    def record(self, step: str, stage: str, fields: dict) -> dict:
        if self.machine is None:
            from measure import machine

            self.machine = machine()
        row = {"tag": self.tag, "shape": self.shape, "hub": models.SHAPES[self.shape]["hub"], "layers": self.layers,
               "experts": self.experts, "tiny": self.tiny, "step": step, "stage": stage,
               "checkpoint_bytes": self.meta["bytes"], "checkpoint_params": self.meta["params"],
               "checkpoint_spec": self.spec_hash,
               "date": datetime.datetime.now().isoformat(timespec="seconds"), "edgeconv_commit": self.commit,
               "machine": self.machine, **fields}
        self.results["rows"] = [r for r in self.results["rows"] if not (r["tag"] == self.tag and r["step"] == step)]
        self.results["rows"].append(row)
        save_results(self.results_path, self.results)
        return row

    def measure(self, step: str, stage: str, cmd: list, artifact: Path | None = None) -> dict:
        """Run cmd as one measured process (measure.py's wrapper: wall time, exact peak RSS); its output goes to
        logs/STEP.log; `other_cpu_s` is the CPU time other processes used meanwhile (a busy machine)."""
        cmd = [str(c) for c in cmd]
        log(f"\n[{self.tag}] {step}: {' '.join(cmd)}")
        self.logs.mkdir(parents=True, exist_ok=True)
        logf = self.logs / f"{step}.log"
        busy0 = busy_cpu_s()
        m = measured(cmd, logf)
        busy = busy_cpu_s() - busy0
        usage = json.loads(logf.with_suffix(".rusage.json").read_text())
        fields = {"command": [rel(c) for c in cmd], "returncode": m["returncode"], "ok": m["returncode"] == 0,
                  "wall_s": round(m["wall_s"], 2), "peak_rss_bytes": m["peak_rss_bytes"],
                  "user_s": round(usage["user_s"], 2), "sys_s": round(usage["sys_s"], 2),
                  "other_cpu_s": round(max(0.0, busy - usage["user_s"] - usage["sys_s"]), 1), "log": rel(logf)}
        if artifact is not None and Path(artifact).exists():
            p = Path(artifact)
            fields["artifact_bytes"] = (sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
                                        if p.is_dir() else p.stat().st_size)
        log(f"  -> rc {m['returncode']}, {m['wall_s']:.1f} s, peak RSS {m['peak_rss_bytes'] / GB:.2f} GB"
            + (f", output {fields['artifact_bytes'] / GB:.2f} GB" if "artifact_bytes" in fields else ""))
        if m["returncode"] != 0:
            fields["output_tail"] = m["output"][-1500:]
            self.record(step, stage, fields)
            log(m["output"][-3000:])
            raise SystemExit(f"{step} failed (rc {m['returncode']}); log: {logf}")
        return fields

    def need_disk(self, what: str, nbytes: float) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.work).free
        if free < nbytes + 2 * GB:
            raise SystemExit(f"{what} needs about {nbytes / GB:.1f} GB and {free / GB:.1f} GB are free on "
                             f"{self.work}: run fewer stages at once, or fewer --layers")

    def shape_counts(self) -> dict:
        """Parameter and byte counts from the shape alone (nothing read or written)."""
        config = models.make_config(self.shape, self.layers, self.experts, tiny=self.tiny, gpt_oss_format=self.fmt,
                                    overrides=self.overrides)
        return models.params_summary(config, models.gpt_oss_format_of(config))

    def convert_disk_bytes(self) -> float:
        """The student in bf16 (the active parameters with the embedding) + up to 4 GB of calibration spill."""
        return self.shape_counts()["active_with_embedding"] * 2 + 4 * GB

    def params(self, model_dir: Path) -> int:
        if model_dir == self.ckpt:  # the writer's count (MXFP4 holds two parameters per byte)
            return self.meta["params"]
        idx = model_dir / "model.safetensors.index.json"
        if idx.exists():  # the student: bf16
            return json.loads(idx.read_text())["metadata"]["total_size"] // 2
        return sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) // 2

    # --- stages -------------------------------------------------------------------------------------------------
    def ensure_checkpoint(self) -> None:
        self.meta = models.write_checkpoint(
            self.ckpt, self.shape, self.layers, self.experts, tiny=self.tiny, gpt_oss_format=self.fmt,
            seed=self.args.seed, logit_scale=self.args.logit_scale, overrides=self.overrides,
            shard_bytes=int(self.args.shard_gb * GB), unigram_prior=self.args.unigram_prior, force=self.args.force,
            log=log)

    def convert(self) -> None:
        if self.done("convert"):
            return log(f"[{self.tag}] convert: done (row in {rel(self.results_path)})")
        for p in (self.student, self.work / "student.work"):
            models.remove(p)
        self.need_disk("convert", self.convert_disk_bytes())
        cmd = [*edgeconv_command(), "convert", self.ckpt, "--out", self.student, "--no-progress"]
        if self.args.calibration_tokens:
            cmd += ["--tokens", self.args.calibration_tokens]
        fields = self.measure("convert", "convert", cmd, self.student)
        extra = {}
        manifest = self.student / "manifest.json"
        if manifest.exists():
            s = json.loads(manifest.read_text()).get("summary", {})
            extra["summary"] = {k: s[k] for k in ("dense_architecture", "dense_width", "dense_params") if k in s}
        self.record("convert", "convert", {**fields, "extra": extra})

    def _keep(self, model: str, quant: str) -> bool:
        return self.args.keep or quant in self.bench_quants  # the bench stage (now or in a later run) reads them

    def _digest(self, path: Path, name: str, delete: bool) -> dict:
        self.digests.mkdir(parents=True, exist_ok=True)
        d = digest_gguf(path)
        (self.digests / f"{name}.json").write_text(json.dumps(d, indent=1, default=str) + "\n")
        if delete:
            path.unlink()
            log(f"  digested and deleted {rel(path)}")
        return d

    def export(self, model: str, quant: str) -> None:
        step = f"export-{model}-{quant}"
        if self.done(step):
            return log(f"[{self.tag}] {step}: done")
        src = self.ckpt if model == "teacher" else self.student
        out = self.gguf / f"{model}-{quant}.gguf"
        self.gguf.mkdir(parents=True, exist_ok=True)
        for f in self.gguf.glob(f"{model}-{quant}.*"):
            models.remove(f)
        n = self.params(src)
        need = n * BYTES_PER_PARAM[quant] + (0 if quant in WRITTEN_DIRECTLY else n * 2)
        self.need_disk(step, need)
        cmd = [*edgeconv_command(), "export", src, "--quant", quant, "--out", out]
        if self.args.parity_layers is not None:
            cmd += ["--parity-layers", self.args.parity_layers]
        fields = self.measure(step, f"export-{model}", cmd, out)
        extra = {"options": f"--parity-layers {self.args.parity_layers}"} if self.args.parity_layers is not None else {}
        report = out.with_suffix(".parity.json")
        if report.exists():
            p = json.loads(report.read_text())
            extra["parity"] = {k: p.get(k) for k in ("max_abs_diff", "max_abs_logit", "top1_agreement", "ppl_ratio",
                                                     "positions_over_tolerance")}
            extra["type_mix"] = p.get("type_mix")
            extra["parity_depth"] = p.get("parity_depth")
        self._digest(out, f"ours-{model}-{quant}", delete=not self._keep(model, quant))
        self.record(step, f"export-{model}", {**fields, "extra": extra})

    def upstream_step(self, model: str, quant: str) -> None:
        step = f"upstream-{model}-{quant}"
        src = self.ckpt if model == "teacher" else self.student
        self.upstream.mkdir(parents=True, exist_ok=True)
        out = self.upstream / f"{model}-{quant}.gguf"
        base = self.args.upstream_base.upper()  # what llama-quantize starts from: F16 (the usual recipe) or BF16
        base_file = self.upstream / f"{model}-{base}.gguf"
        q4_wanted = "Q4_K_M" in self.quants(model)
        if self.done(step):
            return log(f"[{self.tag}] {step}: done")
        n = self.params(src)
        if quant == "Q4_K_M":
            if not base_file.exists():  # deleted after an earlier run, or not one of the types: (re)make it
                self.upstream_step_run(model, base, src, base_file, record=self.row(f"upstream-{model}-{base}") is None)
            self.need_disk(step, n * BYTES_PER_PARAM[quant])
            exe = llama_cpp_tools.build(["llama-quantize"], self.args.jobs)["llama-quantize"]
            fields = self.measure(step, "upstream", [exe, base_file, out, "Q4_K_M"], out)
            self._digest(out, f"upstream-{model}-{quant}", delete=not self.args.keep)
            models.remove(base_file) if not self.args.keep else None
            self.record(step, "upstream", {**fields, "extra": {"base": base}})
            return
        keep_base = quant == base and q4_wanted
        self.upstream_step_run(model, quant, src, out, record=True, delete=not (self.args.keep or keep_base))

    def upstream_step_run(self, model: str, quant: str, src: Path, out: Path, record: bool, delete: bool = False):
        step = f"upstream-{model}-{quant}"
        models.remove(out)
        self.need_disk(step, self.params(src) * BYTES_PER_PARAM[quant])
        cmd = [sys.executable, ROOT / "benchmarks" / "upstream_convert.py", "--tokenizer-pre", "qwen2", "--",
               src, "--outtype", UPSTREAM_TYPES[quant], "--outfile", out]
        fields = self.measure(step, "upstream", cmd, out)
        self._digest(out, f"upstream-{model}-{quant}", delete=delete)
        if record:
            self.record(step, "upstream", {**fields, "extra": {}})

    def compare(self, model: str, quant: str) -> None:
        step = f"compare-{model}-{quant}"
        a, b = self.digests / f"ours-{model}-{quant}.json", self.digests / f"upstream-{model}-{quant}.json"
        if not (a.exists() and b.exists()):
            return
        result = compare_digests(json.loads(a.read_text()), json.loads(b.read_text()))
        log(f"[{self.tag}] {step}: {result['identical_tensors']} identical, {len(result['differing'])} differ, "
            f"{len(result['only_ours'])} only ours, {len(result['only_upstream'])} only upstream; "
            f"{len(result['metadata_differences'])} metadata keys differ")
        self.record(step, "upstream", {"ok": True, "extra": result})

    def cache(self) -> None:
        if self.done("cache"):
            return log(f"[{self.tag}] cache: done")
        for p in (self.work / "teacher-cache", self.work / "distilled", self.work / "distilled.work"):
            models.remove(p)
        cmd = [*edgeconv_command(), "distill", "--teacher", self.ckpt, "--student", self.student, "--mode", "offline",
               "--cache-only", "--tokens", self.args.distill_tokens, "--data", DISTILL_DATA,
               "--teacher-cache", self.work / "teacher-cache", "--out", self.work / "distilled", "--no-progress"]
        fields = self.measure("cache", "cache", cmd, self.work / "teacher-cache")
        self.record("cache", "cache", {**fields, "extra": {"tokens": self.args.distill_tokens}})

    def distill(self) -> None:
        if self.done("distill"):
            return log(f"[{self.tag}] distill: done")
        for p in (self.work / "distilled", self.work / "distilled.work"):
            models.remove(p)
        cmd = [*edgeconv_command(), "distill", "--teacher", self.ckpt, "--student", self.student, "--mode", "offline",
               "--tokens", self.args.distill_tokens, "--data", DISTILL_DATA,
               "--teacher-cache", self.work / "teacher-cache", "--out", self.work / "distilled", "--no-progress",
               *self.args.distill_args.split()]
        fields = self.measure("distill", "distill", cmd, self.work / "distilled")
        extra = {"tokens": self.args.distill_tokens, **({"options": self.args.distill_args}
                                                        if self.args.distill_args else {})}
        manifest = self.work / "distilled" / "manifest.json"
        if manifest.exists():
            s = json.loads(manifest.read_text()).get("summary", {})
            extra["summary"] = {k: s[k] for k in ("tokens", "steps", "first_loss", "final_loss",
                                                  "train_tokens_per_second") if k in s}
        self.record("distill", "distill", {**fields, "extra": extra})

    def bench(self, model: str, quant: str) -> None:
        path = self.gguf / f"{model}-{quant}.gguf"
        tools = llama_cpp_tools.build(["llama-bench", "llama-batched-bench"], self.args.jobs)
        step = f"bench-{model}-{quant}"
        if not self.done(step):
            if not path.exists():
                raise SystemExit(f"{step}: {rel(path)} is gone; rerun export-{model} with --redo")
            cmd = [tools["llama-bench"], "-m", path, "-p", 512, "-n", 128, "-t", "1,2", "-r", self.args.bench_reps,
                   "-o", "json"]
            fields = self.measure(step, "bench", cmd, path)
            tests = json.loads((self.logs / f"{step}.log").read_text()[self._json_start(step):])
            by_t: dict = {}
            for t in tests:
                d = by_t.setdefault(t["n_threads"], {"threads": t["n_threads"], "n_prompt": 512, "n_gen": 128})
                if t["n_prompt"] and not t["n_gen"]:
                    d["pp_ts"] = t["avg_ts"]
                elif t["n_gen"] and not t["n_prompt"]:
                    d["tg_ts"] = t["avg_ts"]
            self.record(step, "bench", {**fields, "extra": {"llama_bench": list(by_t.values()),
                                                           "build_commit": tests[0].get("build_commit")}})
        step = f"batched-{model}-{quant}"
        if not self.done(step):
            npl, npp, ntg = 16, 128, 128
            cmd = [tools["llama-batched-bench"], "-m", path, "-c", npl * (npp + ntg), "-b", 2048, "-ub", 512,
                   "-npp", npp, "-ntg", ntg, "-npl", f"1,{npl}", "-t", 2, "--output-format", "jsonl"]
            # llama.cpp's logger thread is never joined at exit (common_log_main() leaks it on purpose, llama.cpp
            # issue 22142), so batched-bench's last result lines are sometimes lost with exit status 0: retry.
            for attempt in range(1, 4):
                fields = self.measure(step, "bench", cmd, path)
                batched = []
                for line in (self.logs / f"{step}.log").read_text().splitlines():
                    line = line.strip()
                    if line.startswith("{") and '"pl"' in line:
                        batched.append(json.loads(line))
                if {b.get("pl") for b in batched} >= {1, npl}:
                    break
                log(f"  batched-bench printed {len(batched)} of 2 result lines (lost at exit): attempt {attempt + 1}")
            self.record(step, "bench", {**fields, "extra": {"batched": batched, "attempts": attempt}})

    def _json_start(self, step: str) -> int:
        text = (self.logs / f"{step}.log").read_text()
        return text.index("[\n") if "[\n" in text else text.index("[")

    def build(self) -> None:
        """Issue 21: the whole `edgeconv build` for a device target, measured as one process."""
        if self.done("build"):
            return log(f"[{self.tag}] build: done")
        out = self.work / "bundle-jetson"
        for p in (out, self.work / "bundle-jetson.work"):
            models.remove(p)
        cmd = [*edgeconv_command(), "build", self.ckpt, "--target", "jetson", "--distill-tokens", 0, "--out", out,
               "--no-progress"]
        if self.args.calibration_tokens:
            cmd += ["--calibration-tokens", self.args.calibration_tokens]
        fields = self.measure("build", "build", cmd, out)
        extra = {}
        manifest = out / "manifest.json"
        if manifest.exists():  # planned (the build's memory estimate) vs written bytes, and the parity it passed
            m = json.loads(manifest.read_text())
            est = m.get("estimate") or {}
            model = out / str(m.get("model", ""))
            extra["summary"] = {
                "target": m.get("target"), "quant": m.get("quant"), "dense_params": est.get("params"),
                "planned_weights_bytes": est.get("weights_bytes"), "planned_total_bytes": est.get("total_bytes"),
                "written_model_bytes": model.stat().st_size if model.is_file() else None, "fits": est.get("fits")}
            parity = out / "parity.json"
            if parity.exists():
                p = json.loads(parity.read_text())
                extra["parity"] = {k: p.get(k) for k in ("max_abs_diff", "max_abs_logit", "top1_agreement",
                                                         "ppl_ratio", "positions_over_tolerance")}
            extra["manifest"] = m
        self.record("build", "build", {**fields, "extra": extra})

    # --- driver ---------------------------------------------------------------------------------------------------
    def quants(self, model: str) -> list[str]:
        return (self.args.teacher_quants if model == "teacher" else self.args.student_quants).split(",")

    def dry_run(self) -> None:
        """The disk each step needs at its peak (the checkpoint stays; GGUFs are deleted once digested, except the
        --bench-quants ones), from the shapes alone; nothing is written."""
        counts = self.shape_counts()
        ckpt, n, student = counts["bytes"], counts["params"], counts["active_with_embedding"]
        free = shutil.disk_usage(self.work if self.work.exists() else WORK.parent).free
        have = sum(f.stat().st_size for f in self.ckpt.rglob("*") if f.is_file()) if self.ckpt.exists() else 0
        print(f"{self.tag}: checkpoint {ckpt / GB:.1f} GB ({n / 1e9:.2f} B params; {have / GB:.1f} GB written), "
              f"student ~{student / 1e9:.2f} B params ({student * 2 / GB:.1f} GB bf16); {free / GB:.1f} GB free now")
        kept = 0.0
        rows = [("write checkpoint", ckpt - have)]
        if "convert" in self.stages:
            rows.append(("convert (student, + 4 GB for a calibration spill)", self.convert_disk_bytes()))
        for model, size in (("teacher", n), ("student", student)):
            for q in self.quants(model):
                inter = 0 if q in WRITTEN_DIRECTLY else size * 2
                if "export-" + model in self.stages:
                    rows.append((f"export-{model}-{q} (output{' + BF16 intermediate' if inter else ''})",
                                 kept + size * BYTES_PER_PARAM[q] + inter))
                    if q in self.bench_quants:
                        kept += size * BYTES_PER_PARAM[q]
                if "upstream" in self.stages:
                    base = size * 2 if q == "Q4_K_M" else 0
                    rows.append((f"upstream-{model}-{q}", kept + size * BYTES_PER_PARAM[q] + base))
        after = free - (ckpt - have)  # free once the checkpoint is written
        for what, need in rows:
            fits = need + GB <= free if what == "write checkpoint" else need + 2 * GB <= after
            print(f"  {what:<58} {need / GB:8.1f} GB  {'fits' if fits else 'DOES NOT FIT'}")
        print(f"  (each step: GB on disk beside the checkpoint, with the kept --bench-quants GGUFs; "
              f"{after / GB:.1f} GB free beside it, 2 GB kept spare)")

    def main(self) -> None:
        self.stages = [s for s in self.args.stages.split(",") if s]
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise SystemExit(f"unknown stage(s) {unknown}: {', '.join(STAGES)}")
        self.bench_quants = [q for q in self.args.bench_quants.split(",") if q]
        if self.args.dry_run:
            return self.dry_run()
        self.ensure_checkpoint()
        self.spec_hash = hashlib.sha256(json.dumps(self.meta["spec"], sort_keys=True).encode()).hexdigest()[:12]
        stale = [r for r in self.results["rows"] if r["tag"] == self.tag and r.get("checkpoint_spec") != self.spec_hash]
        if stale:  # measured on a checkpoint written with another spec: drop them and what was made from it
            log(f"[{self.tag}] dropping {len(stale)} rows measured on a checkpoint of another spec")
            self.results["rows"] = [r for r in self.results["rows"] if r not in stale]
            save_results(self.results_path, self.results)
            for p in (self.student, self.work / "student.work", self.gguf, self.upstream, self.digests):
                models.remove(p)
        log(f"[{self.tag}] checkpoint {rel(self.ckpt)}: {self.meta['bytes'] / GB:.2f} GB; results -> "
            f"{rel(self.results_path)}")
        if "upstream" in self.stages or "bench" in self.stages:
            llama_cpp_tools.build(["llama-bench", "llama-quantize", "llama-batched-bench"], self.args.jobs)
            llama_cpp_tools.converter_deps()  # a pip install, if any, is not part of a measured command
        needs_student = {"export-student", "cache", "distill", "bench", "upstream"} & set(self.stages)
        if "convert" in self.stages or (needs_student and not (self.student / "config.json").exists()):
            self.convert()
        if "export-teacher" in self.stages:
            for q in self.quants("teacher"):
                self.export("teacher", q)
        if "export-student" in self.stages:
            for q in self.quants("student"):
                self.export("student", q)
        if "upstream" in self.stages:
            for model in ("teacher", "student"):
                for q in sorted(self.quants(model), key=lambda q: q == "Q4_K_M"):  # the f16 before its Q4_K_M
                    self.upstream_step(model, q)
                for q in self.quants(model):
                    self.compare(model, q)
        if "cache" in self.stages:
            self.cache()
        if "distill" in self.stages:
            self.distill()
        if "bench" in self.stages:
            for model in ("teacher", "student"):
                for q in self.bench_quants:
                    if q in self.quants(model):
                        self.bench(model, q)
        if "build" in self.stages:
            self.build()
        log(f"\nresults: {rel(self.results_path)} and {rel(self.results_path.with_suffix('.md'))}")


def tag_of(shape: str, layers: int, experts, tiny: bool, fmt: str, logit_scale: float, overrides: dict,
           unigram_prior: float = 0.0) -> str:
    tag = f"{shape}-L{layers}"
    if experts:
        tag += f"-E{experts}"
    if tiny:
        tag += "-tiny"
    if models.arch(models.SHAPES[shape]["config"]) == "GptOssForCausalLM" and fmt != "mxfp4":
        tag += f"-{fmt}"
    if logit_scale != 1.0:
        tag += f"-ls{logit_scale:g}"
    if unigram_prior:
        tag += f"-up{unigram_prior:g}"
    if overrides:
        tag += "-" + hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:6]
    return tag


# ---------------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------------


def cmd_list(args) -> int:
    print(f"{'shape':<20} {'hub id':<30} {'layers':>6} {'experts':>7} {'full GB':>8} {'GB/layer':>8} "
          f"{'min layers':>10} {'GB at min':>9}")
    for name, spec in models.SHAPES.items():
        c = spec["config"]
        full = models.params_summary(models.make_config(name), "mxfp4")["bytes"]
        lo = models.min_layers(name)
        at_min = models.params_summary(models.make_config(name, lo), "mxfp4")["bytes"]
        per = (full - at_min) / (int(c["num_hidden_layers"]) - lo)
        print(f"{name:<20} {spec['hub']:<30} {c['num_hidden_layers']:>6} {c[models.EXPERTS_KEY[models.arch(c)]]:>7} "
              f"{full / GB:>8.2f} {per / GB:>8.2f} {lo:>10} {at_min / GB:>9.2f}")
    print("(demo vocabulary of 4,096 tokens; GPT-OSS experts in MXFP4)")
    return 0


def cmd_write(args) -> int:
    shape = models.resolve(args.shape)
    overrides = parse_overrides(args.set)
    out = Path(args.out or WORK / tag_of(shape, args.layers, args.experts, args.tiny, args.gpt_oss_format,
                                         args.logit_scale, overrides, args.unigram_prior) / "teacher")
    models.write_checkpoint(out, shape, args.layers, args.experts, tiny=args.tiny, gpt_oss_format=args.gpt_oss_format,
                            seed=args.seed, logit_scale=args.logit_scale, overrides=overrides,
                            shard_bytes=int(args.shard_gb * GB), force=args.force, unigram_prior=args.unigram_prior,
                            log=log)
    if not args.no_inspect:
        sys.stdout.flush()
        subprocess.run([*edgeconv_command(), "inspect", str(out)], check=True)
    print(out)
    return 0


def cmd_check(args) -> int:
    """transformers loads the checkpoint; with --forward, a forward on demo text: loss, perplexity and the
    perplexity of the model's own predictions (exp of the mean entropy), to see what --logit-scale does."""
    import math
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    # transformers 4.57 dequantizes MXFP4 experts to bf16 on a CPU, whatever dtype is asked for: load all in bf16
    quantized = "quantization_config" in json.loads((args.model / "config.json").read_text())
    dtype = torch.bfloat16 if quantized else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"loaded {type(model).__name__} from {args.model}: {n / 1e9:.3f} B params in "
          f"{time.perf_counter() - t0:.1f} s")
    if args.forward:
        tok = AutoTokenizer.from_pretrained(args.model)
        text = " ".join(json.loads(line)["text"] for line in DISTILL_DATA.read_text().splitlines()[:50])
        ids = tok(text, return_tensors="pt")["input_ids"][:, : args.tokens]
        with torch.no_grad():
            logits = model(ids).logits.float()
        logp = torch.log_softmax(logits[0, :-1], -1)
        nll = -logp.gather(1, ids[0, 1:, None]).mean().item()
        entropy = -(logp.exp() * logp).sum(-1).mean().item()
        print(f"forward on {ids.shape[1]} tokens: finite {bool(torch.isfinite(logits).all())}, logit std "
              f"{logits.std().item():.3f}, loss {nll:.3f} (perplexity {math.exp(nll):,.1f} of vocab "
              f"{logits.shape[-1]:,}), prediction entropy {entropy:.3f} (exp {math.exp(entropy):,.1f})")
    return 0


def cmd_render(args) -> int:
    path = Path(args.results or RESULTS)
    results = load_results(path)
    save_results(path, results)
    print(path.with_suffix(".md").read_text())
    return 0


def add_shape_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("shape", help=f"one of {', '.join(models.SHAPES)} (or {', '.join(models.ALIASES)})")
    ap.add_argument("--layers", type=int, required=True, help="decoder layers (the published depth or fewer)")
    ap.add_argument("--experts", type=int, default=None, help="routed experts per layer instead of the published count")
    ap.add_argument("--gpt-oss-format", choices=["mxfp4", "bf16"], default="mxfp4",
                    help="GPT-OSS experts as released (MXFP4 blocks + scales) or transformers' bf16 layout")
    ap.add_argument("--logit-scale", type=float, default=1.0,
                    help="std of the output head = 0.02 x this (sharper next-token distributions)")
    ap.add_argument("--unigram-prior", type=float, default=0.0, metavar="B",
                    help="give the random teacher a unigram prior of strength B through residual channel 0, so its "
                         "perplexity on the demo text can fall far below the vocabulary (real_shape_models.py)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a config.json value, e.g. --set rope_scaling.truncate=true (repeatable)")
    ap.add_argument("--shard-gb", type=float, default=4.0, help="largest safetensors shard, GB")
    ap.add_argument("--tiny", action="store_true", help="debug: the same structure with tiny widths (harness tests)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the shapes and their sizes")
    w = sub.add_parser("write", help="write a random checkpoint of a shape")
    add_shape_args(w)
    w.add_argument("--out", type=Path, default=None, help="[default: benchmarks/_work/real_shape/TAG/teacher]")
    w.add_argument("--force", action="store_true", help="replace a real-shape checkpoint of another spec")
    w.add_argument("--no-inspect", action="store_true", help="skip `edgeconv inspect` afterwards")
    c = sub.add_parser("check", help="load a written checkpoint in transformers (and run a forward)")
    c.add_argument("model", type=Path)
    c.add_argument("--forward", action="store_true")
    c.add_argument("--tokens", type=int, default=256)
    r = sub.add_parser("run", help="write if missing, then run and measure the stages")
    add_shape_args(r)
    r.add_argument("--stages", default=DEFAULT_STAGES, help=f"comma list of {', '.join(STAGES)}")
    r.add_argument("--teacher-quants", default="F16,Q8_0")
    r.add_argument("--student-quants", default="F16,Q8_0,Q4_K_M")
    r.add_argument("--upstream-base", choices=["f16", "bf16"], default="f16",
                   help="the float GGUF llama-quantize starts from upstream (edgeconv starts from BF16 for bf16 "
                        "checkpoints: with bf16 the Q4_K_M tensors can be compared byte for byte too)")
    r.add_argument("--bench-quants", default="Q4_K_M,Q8_0",
                   help="GGUF types benchmarked for teacher and student (where exported); these GGUFs are kept on "
                        "disk for the bench stage (pass '' to keep none)")
    r.add_argument("--bench-reps", type=int, default=3, help="llama-bench -r")
    r.add_argument("--parity-layers", type=int, default=None,
                   help="edgeconv export --parity-layers N (0: the whole file) [its default]")
    r.add_argument("--calibration-tokens", type=int, default=None,
                   help="edgeconv convert --tokens and build --calibration-tokens [their default]")
    r.add_argument("--distill-tokens", type=int, default=16384, help="tokens of the cache fill and the distillation")
    r.add_argument("--distill-args", default="",
                   help="more `edgeconv distill` options for the distill stage, e.g. '--lora-rank 16 --grad-accum 4' "
                        "(a student whose AdamW state does not fit in memory)")
    r.add_argument("--dry-run", action="store_true", help="print the disk each step needs and stop")
    r.add_argument("--redo", action="store_true", help="rerun stages whose rows exist")
    r.add_argument("--force", action="store_true", help="rewrite a real-shape checkpoint written with another spec")
    r.add_argument("--keep", action="store_true", help="keep every GGUF (default: digested, then deleted)")
    r.add_argument("--jobs", type=int, default=2, help="cmake build jobs if llama.cpp must be built")
    r.add_argument("--work", type=Path, default=None, help="[default: benchmarks/_work/real_shape/TAG]")
    r.add_argument("--results", type=Path, default=None, help="[default: benchmarks/results/real_shape.json]")
    d = sub.add_parser("render", help="rewrite real_shape.md from real_shape.json")
    d.add_argument("--results", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.command == "list":
        return cmd_list(args)
    if args.command == "write":
        return cmd_write(args)
    if args.command == "check":
        return cmd_check(args)
    if args.command == "render":
        return cmd_render(args)
    Run(args).main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
