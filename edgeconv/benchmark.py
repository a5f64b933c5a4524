"""`edgeconv bench`: the bundle's own bench.py, run here; with a teacher, the MoE too, on the same runtime.

The runner always runs in its own process, so the peak RSS it reports is the model's and the runtime's, not
torch's or edgeconv's. The teacher is exported to GGUF at the student's quantization (once; reused after)
and measured right after the student by the same runner with the same settings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgeconv.errors import EdgeconvError
from edgeconv.io.output_dir import MANIFEST, read_manifest

RUNNER = Path(__file__).parent / "bundle" / "bench.py"


@dataclass
class BenchTarget:
    """What to measure: a bundle (its bench.py, manifest and eval data) or a bare artifact."""

    path: Path
    bundle: bool
    fmt: str
    quant: str | None
    teacher: str | None  # the MoE the bundle was built from, if known

    @property
    def runner(self) -> Path:
        return self.path / "bench.py" if self.bundle else RUNNER


def resolve(path: Path) -> BenchTarget:
    path = Path(path)
    if path.is_dir() and (path / MANIFEST).is_file() and (path / "bench.py").is_file():
        m = json.loads((path / MANIFEST).read_text())
        return BenchTarget(path, True, m.get("format", "gguf"), m.get("quant"), m.get("teacher"))
    if path.is_file() and path.suffix == ".gguf":
        return BenchTarget(path, False, "gguf", gguf_quant(path), None)
    if path.is_dir() and (path / "genai_config.json").is_file():
        manifest = read_manifest(path) or {}
        return BenchTarget(path, False, "onnx-genai", manifest.get("options", {}).get("precision"), None)
    raise EdgeconvError(f"{path} is neither a bundle, a .gguf file nor an onnxruntime-genai model directory",
                        "pass dist/<model>-<target>/ from `edgeconv build`, or an artifact from `edgeconv export`")


def gguf_quant(path: Path) -> str | None:
    """The file type llama.cpp recorded (Q4_K_M, F16, ...)."""
    import gguf

    field = gguf.GGUFReader(path).fields.get("general.file_type")
    if field is None:
        return None
    name = gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def run_runner(target: BenchTarget, out: Path, *, role: str, label: str, threads: int | None, quick: bool,
               eval_data: Path | None, model: Path | None = None, extra: list[str] | None = None) -> dict:
    """One run of bench.py in a fresh interpreter; returns its results.json."""
    from edgeconv.demo import EVAL_DATA

    cmd = [sys.executable, str(target.runner), "--out", str(out), "--role", role, "--label", label]
    if target.bundle:
        cmd += ["--bundle", str(target.path)]
        if eval_data:
            cmd += ["--data", str(eval_data)]
    else:
        cmd += ["--no-verify", "--data", str(eval_data or EVAL_DATA)]
    if model is not None or not target.bundle:
        cmd += ["--model", str(model or target.path)]
        if target.bundle:
            cmd += ["--no-verify"]  # the teacher is not part of the student's bundle
    if threads:
        cmd += ["--threads", str(threads)]
    if quick:
        cmd += ["--quick"]
    cmd += extra or []
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, text=True, capture_output=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise EdgeconvError(f"bench.py failed on {model or target.path}: {last[0]}", f"run it by hand: {' '.join(cmd)}")
    return json.loads(out.read_text())


def teacher_gguf(teacher: str, quant: str, where: Path, log: Callable[[str], None]) -> Path:
    """The MoE teacher at the student's quantization, exported once (with its parity check) and reused."""
    from edgeconv.io.checkpoint import resolve_model_path
    from edgeconv.stages.export_gguf import export_gguf

    src = resolve_model_path(teacher)
    path = where / f"{src.name}-{quant}.gguf"
    if path.is_file() and path.with_suffix(".parity.json").is_file():
        return path
    log(f"exporting the teacher {src.name} to GGUF {quant} -> {path}")
    export_gguf(src, path, quant, force=True)
    return path


def bench(path: Path, out_dir: Path, *, teacher: str | None = None, with_teacher: bool = False,
          threads: int | None = None, quick: bool = False, eval_data: Path | None = None,
          log: Callable[[str], None] = print) -> dict:
    """Measure the student (and the teacher): writes OUT/results-student.json [, results-teacher.json,
    comparison.json]; returns {"student": ..., "teacher": ...}."""
    target = resolve(path)
    out_dir = Path(out_dir)
    name = target.path.name if target.bundle else target.path.stem
    log(f"bench {target.path} ({target.fmt} {target.quant or ''})")
    student = run_runner(target, out_dir / "results-student.json", role="student", label=name, threads=threads,
                         quick=quick, eval_data=eval_data)
    results = {"student": student}
    if with_teacher:
        teacher = teacher or target.teacher
        if not teacher:
            raise EdgeconvError(f"{path} does not say which teacher it came from", "pass --teacher MODEL")
        if target.fmt != "gguf" or not target.quant:
            raise EdgeconvError("--teacher compares GGUF files at one quantization", "bench a GGUF bundle or file")
        gguf_path = teacher_gguf(teacher, target.quant, out_dir, log)
        log(f"bench the teacher {gguf_path.name} with the same runner and settings")
        results["teacher"] = run_runner(target, out_dir / "results-teacher.json", role="teacher",
                                        label=gguf_path.stem, threads=threads, quick=quick, eval_data=eval_data,
                                        model=gguf_path)
        (out_dir / "comparison.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def comparison_rows(results: dict) -> list[tuple[str, ...]]:
    """(metric, student, teacher, student/teacher) rows for the terminal."""
    s, t = results["student"], results.get("teacher")

    def acc(r, key):
        return (r.get("accuracy") or {}).get(key)

    metrics = [
        ("model file", lambda r: r["model"]["bytes"] / 1e6, "{:,.1f} MB"),
        ("peak RSS", lambda r: r["peak_rss_mb"], "{:,.0f} MB"),
        ("load", lambda r: r["load_s"], "{:.2f} s"),
        ("decode", lambda r: r["decode_tok_s"], "{:,.0f} tok/s"),
        ("time to first token", lambda r: r["speed"][0]["ttft_ms"], "{:,.1f} ms"),
    ]
    for corpus in (acc(s, "perplexity") or {}):
        metrics.append((f"perplexity {corpus}", lambda r, c=corpus: acc(r, "perplexity")[c], "{:,.1f}"))
    metrics += [("exact match (mean)", lambda r: acc(r, "exact_match_mean"), "{:.1%}"),
                ("multiple choice", lambda r: acc(r, "choice_acc"), "{:.1%}")]
    rows = []
    for label, get, fmt in metrics:
        try:
            a = get(s)
            b = get(t) if t else None
        except (KeyError, IndexError, TypeError):
            continue
        def cell(v, fmt=fmt):
            return "-" if v is None else fmt.format(v)

        ratio = f"{a / b:.2f}x" if (a is not None and b) else ""
        rows.append((label, cell(a), cell(b) if t else "", ratio))
    return rows
