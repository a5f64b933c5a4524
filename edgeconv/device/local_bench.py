"""`edgeconv bench`: the bundle's own bench.py, run here; with a teacher, the MoE too, on the same runtime.

A bundle is verified against its manifest here, in edgeconv's process, before any process starts: every
file's size and sha256, bench.py included (edgeconv/device/verify.py); with --expect-sha256, manifest.json
itself against the hash `edgeconv build` printed. What then runs is the bench.py bytes that were hashed.

The runner always runs in its own process, so the peak RSS it reports is the model's and the runtime's, not
torch's or edgeconv's. The teacher is exported to GGUF at the student's quantization (once; reused after)
and measured right after the student by the same runner with the same settings.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgeconv.device.verify import VerifiedBundle, verify_bundle
from edgeconv.errors import EdgeconvError
from edgeconv.io.output_dir import MANIFEST, read_manifest, sha256_file

logger = logging.getLogger(__name__)

RUNNER = Path(__file__).parent / "runner.py"


@dataclass
class BenchTarget:
    """What to measure: a bundle (its bench.py, manifest and eval data) or a bare artifact."""

    path: Path
    bundle: bool
    fmt: str
    quant: str | None
    teacher: str | None  # the MoE the bundle was built from, if known
    verified: VerifiedBundle | None = None  # a bundle's manifest and bench.py bytes, as checked


def is_bundle(path: Path) -> bool:
    """A directory with manifest.json and bench.py, or whose manifest lists a bench.py (then reported missing)."""
    if not (path.is_dir() and (path / MANIFEST).is_file()):
        return False
    if (path / "bench.py").exists():
        return True
    try:
        files = json.loads((path / MANIFEST).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(files, dict) and "bench.py" in files


def resolve(path: Path, expect_sha256: str | None = None) -> BenchTarget:
    """What PATH is. A bundle is verified against its manifest (and the manifest against EXPECT_SHA256) here,
    before anything of it runs: EdgeconvError if it does not match."""
    path = Path(path)
    if is_bundle(path):
        checked = verify_bundle(path, expect_sha256)
        m = checked.manifest
        return BenchTarget(path, True, m.get("format", "gguf"), m.get("quant"), m.get("teacher"), checked)
    if expect_sha256 is not None:
        raise EdgeconvError(f"{path} is not a bundle: --expect-sha256 checks a bundle's manifest.json",
                            "pass the bundle directory, or drop --expect-sha256")
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


@contextlib.contextmanager
def verified_runner(checked: VerifiedBundle) -> Iterator[Path]:
    """The bundle's bench.py as it was hashed, written to a private directory of ours and hashed again there.

    Running that copy rather than BUNDLE/bench.py closes the gap between the check and the start: a bench.py
    replaced after verify_bundle() never runs, and the bundle's directory is not on the runner's sys.path (a
    json.py dropped there is not imported). What remains: someone who can write the bundle while bench.py runs
    can swap the model or the eval data between bench.py's own check and its use of them."""
    want = checked.manifest["files"]["bench.py"]["sha256"]
    where = Path(tempfile.mkdtemp(prefix="edgeconv-bench-"))  # mode 0700: ours alone
    try:
        runner = where / "bench.py"
        with open(runner, "xb") as fh:
            fh.write(checked.runner)
        if sha256_file(runner) != want:  # what will run, read back from the disk
            raise EdgeconvError(f"the copy of {checked.path / 'bench.py'} to run does not match manifest.json",
                                f"check the disk holding {where.parent}; nothing was run")
        yield runner
    finally:
        shutil.rmtree(where, ignore_errors=True)


def run_runner(target: BenchTarget, out: Path, *, role: str, label: str, threads: int | None, quick: bool,
               eval_data: Path | None, model: Path | None = None, extra: list[str] | None = None) -> dict:
    """One run of bench.py in a fresh interpreter; returns its results.json. A bundle's runner runs only as the
    bytes verified against its manifest (verified first if `resolve` did not)."""
    if not target.bundle:
        return _run(RUNNER, target, out, role=role, label=label, threads=threads, quick=quick,
                    eval_data=eval_data, model=model, extra=extra)
    checked = target.verified or verify_bundle(target.path)
    with verified_runner(checked) as runner:
        return _run(runner, target, out, role=role, label=label, threads=threads, quick=quick,
                    eval_data=eval_data, model=model, extra=extra)


def _run(runner: Path, target: BenchTarget, out: Path, *, role: str, label: str, threads: int | None, quick: bool,
         eval_data: Path | None, model: Path | None, extra: list[str] | None) -> dict:
    from edgeconv.demo import EVAL_DATA

    cmd = [sys.executable, str(runner), "--out", str(out), "--role", role, "--label", label]
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
        by_hand = [str(target.path / "bench.py") if c == str(runner) and target.bundle else c for c in cmd]
        raise EdgeconvError(f"bench.py failed on {model or target.path}: {last[0]}",
                            f"run it by hand: {' '.join(by_hand)}")
    return json.loads(out.read_text())


def teacher_gguf(teacher: str, quant: str, where: Path) -> Path:
    """The MoE teacher at the student's quantization, exported once (with its parity check) and reused."""
    from edgeconv.io.checkpoint import resolve_model_path
    from edgeconv.stages.export_gguf import export_gguf

    src = resolve_model_path(teacher)
    path = where / f"{src.name}-{quant}.gguf"
    if path.is_file() and path.with_suffix(".parity.json").is_file():
        return path
    logger.info(f"exporting the teacher {src.name} to GGUF {quant} -> {path}")
    export_gguf(src, path, quant, force=True)
    return path


def bench(path: Path, out_dir: Path, *, teacher: str | None = None, with_teacher: bool = False,
          threads: int | None = None, quick: bool = False, eval_data: Path | None = None,
          expect_sha256: str | None = None) -> dict:
    """Measure the student (and the teacher): writes OUT/results-student.json [, results-teacher.json,
    comparison.json]; returns {"student": ..., "teacher": ...}. A bundle is verified first (EXPECT_SHA256: the
    hash of its manifest.json that `edgeconv build` printed), and refused before any process starts."""
    target = resolve(path, expect_sha256)
    out_dir = Path(out_dir)
    name = target.path.name if target.bundle else target.path.stem
    if target.verified:
        logger.info(f"verified {len(target.verified.manifest['files'])} files against manifest.json "
                    f"(sha256 {target.verified.manifest_sha256}{', as expected' if expect_sha256 else ''})")
    logger.info(f"bench {target.path} ({target.fmt} {target.quant or ''})")
    student = run_runner(target, out_dir / "results-student.json", role="student", label=name, threads=threads,
                         quick=quick, eval_data=eval_data)
    results = {"student": student}
    if with_teacher:
        teacher = teacher or target.teacher
        if not teacher:
            raise EdgeconvError(f"{path} does not say which teacher it came from", "pass --teacher MODEL")
        if target.fmt != "gguf" or not target.quant:
            raise EdgeconvError("--teacher compares GGUF files at one quantization", "bench a GGUF bundle or file")
        gguf_path = teacher_gguf(teacher, target.quant, out_dir)
        logger.info(f"bench the teacher {gguf_path.name} with the same runner and settings")
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
