"""GGUF metadata keys: what llama.cpp's convert_hf_to_gguf.py writes, next to what edgeconv writes (issue 20).

The cases are small checkpoints written here: the two shipped demo models; the six released MoE shapes of
real_shape_models.py at tiny widths (their published config.json: rope scaling, sliding windows, MLA, everything
that decides which keys a converter writes) and, for each, the dense student edgeconv assembles from it (its
model card included, which upstream's converter reads too); and a Qwen3-MoE teacher as the hub delivers one, a
snapshot in the Hugging Face cache with a model card (license, base model, tags, languages, datasets) and
sampling defaults in generation_config.json, plus its student, so the keys that come from cards, hub ids and
generation configs are exercised.

    python benchmarks/gguf_keys.py            # upstream's keys, every case: benchmarks/results/gguf_upstream_keys.json
    python benchmarks/gguf_keys.py --compare  # edgeconv's keys next to that list (no llama.cpp needed)

Upstream runs as benchmarks/upstream_convert.py runs it: the vendored convert_hf_to_gguf.py of the llama-cpp-python
sdist (llama_cpp_tools.source()) with its own gguf-py, `--outtype f16`. Only key names are recorded: the values
differ by design in places (general.name, a local base model's name). tests/test_gguf_metadata.py checks that
every key upstream writes is one edgeconv writes (or is listed there with the reason it is not), and, where the
vendored source is unpacked, that this list is still what upstream writes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "gguf_upstream_keys.json"
sys.path.insert(0, str(HERE))
import llama_cpp_tools  # noqa: E402
import real_shape_models as rs  # noqa: E402

ASSETS = ROOT / "edgeconv" / "assets"
DEMOS = {"demo-moe": ASSETS / "demo-moe", "demo-dense": ASSETS / "demo-dense"}
# Config changes a shape needs before edgeconv exports it at all: llama.cpp runs GPT-OSS's YaRN truncated only
# (edgeconv refuses truncate=false), and DeepSeek-V2 without q-LoRA only at V2-Lite's 27 layers.
OVERRIDES = {"gpt-oss-20b": {"rope_scaling.truncate": True}}
LAYERS = {"deepseek-v2-lite": 27}
HUB_ID = "Qwen/Qwen3-30B-A3B"
HUB_REVISION = "0123456789abcdef0123456789abcdef01234567"
HUB_CARD = """---
license: apache-2.0
license_link: https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/LICENSE
library_name: transformers
pipeline_tag: text-generation
base_model: Qwen/Qwen3-30B-A3B-Base
tags:
- moe
language:
- en
datasets:
- wikitext
---

# Qwen3-30B-A3B (the shape, random weights: a test case of benchmarks/gguf_keys.py)
"""
HUB_GENERATION = {"bos_token_id": None, "do_sample": True, "eos_token_id": 0, "pad_token_id": 0,
                  "temperature": 0.6, "top_k": 20, "top_p": 0.95}


def _teacher(out: Path, shape: str) -> Path:
    if not (out / rs.META).exists():
        rs.write_checkpoint(out, shape, LAYERS.get(shape, rs.min_layers(shape) + 1), tiny=True,
                            overrides=OVERRIDES.get(shape), shard_bytes=50_000_000, log=lambda m: None)
    return out


def _student(teacher: Path, out: Path) -> Path:
    from edgeconv.families import family_for
    from edgeconv.planning.calibration_free import simple_plan
    from edgeconv.stages.assemble import assemble

    config = json.loads((teacher / "config.json").read_text())
    family = family_for(config, str(teacher))
    assemble(teacher, simple_plan(family, f"first:{family.top_k}"), out, progress=False)
    return out


def _hub_teacher(root: Path) -> Path:
    """A Qwen3-MoE teacher where the hub puts one: ROOT/models--Qwen--Qwen3-30B-A3B/snapshots/REV, card included."""
    snapshot = root / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / HUB_REVISION
    if not (snapshot / rs.META).exists():
        _teacher(snapshot, "qwen3-30b-a3b")
        (snapshot / "README.md").write_text(HUB_CARD)
        gen = {k: v for k, v in HUB_GENERATION.items() if v is not None}
        (snapshot / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return snapshot


def make_cases(root: Path, names: list[str] | None = None) -> dict[str, Path]:
    """Case name -> checkpoint directory, written under `root` (reused when already there). `names`: only these."""
    root = Path(root)
    want = set(names) if names else None
    cases: dict[str, Path] = {}

    def wanted(*case: str) -> bool:
        return want is None or bool(want & set(case))

    for name, path in DEMOS.items():
        if wanted(name):
            cases[name] = path
    for shape in rs.SHAPES:
        if not wanted(shape, f"{shape}-student"):
            continue
        teacher = _teacher(root / shape, shape)
        if wanted(shape):
            cases[shape] = teacher
        if wanted(f"{shape}-student"):
            student = root / f"{shape}-student"
            cases[f"{shape}-student"] = student if (student / "manifest.json").exists() else _student(teacher, student)
    if wanted("hub", "hub-student"):
        teacher = _hub_teacher(root / "hub-cache")
        if wanted("hub"):
            cases["hub"] = teacher
        if wanted("hub-student"):
            student = root / "hub-student"
            cases["hub-student"] = student if (student / "manifest.json").exists() else _student(teacher, student)
    return cases


def keys_of(path: Path) -> set[str]:
    """The key-value names of a GGUF file."""
    import gguf

    return {f.name for f in gguf.GGUFReader(path).fields.values() if not f.name.startswith("GGUF.")}


def edgeconv_keys(model_dir: Path, name: str | None = None) -> set[str]:
    """The keys edgeconv's float GGUF of `model_dir` holds (declared, not written: no tensor data needed)."""
    from edgeconv.export.gguf.writer import plan_gguf

    plan = plan_gguf(Path(model_dir), "F16", name=name)
    try:
        return {"general.architecture", *plan.writer.kv_data[0]}
    finally:
        plan.close()


def upstream_keys(model_dir: Path, work: Path) -> set[str]:
    """The keys of the F16 GGUF llama.cpp's converter writes for `model_dir` (runs benchmarks/upstream_convert.py)."""
    out = Path(work) / f"{Path(model_dir).name}-upstream.gguf"
    cmd = [sys.executable, str(HERE / "upstream_convert.py"), "--", str(model_dir), "--outtype", "f16",
           "--outfile", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {model_dir}:\n{done.stderr[-3000:]}")
    try:
        return keys_of(out)
    finally:
        out.unlink(missing_ok=True)


def vendored_source() -> Path | None:
    """The unpacked vendored llama.cpp (benchmarks/_work), or None: nothing is downloaded to look."""
    src = llama_cpp_tools.SDIST_DIR / f"llama_cpp_python-{llama_cpp_tools.VERSION}" / "vendor" / "llama.cpp"
    return src if (src / "convert_hf_to_gguf.py").is_file() else None


def generate(work: Path, names: list[str] | None = None) -> dict:
    cases = make_cases(work / "cases", names)
    return {name: sorted(upstream_keys(path, work)) for name, path in cases.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare", action="store_true", help="edgeconv's keys against the recorded list")
    ap.add_argument("--work", type=Path, default=None, help="where the cases are written [default: a temp dir]")
    ap.add_argument("--case", action="append", help="only this case (repeatable)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="gguf-keys-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.compare:
            recorded = json.loads(RESULTS.read_text())["cases"]
            for name, path in make_cases(work / "cases", args.case).items():
                ours, theirs = edgeconv_keys(path), set(recorded[name])
                print(f"{name}: upstream {len(theirs)} keys, edgeconv {len(ours)}; only upstream: "
                      f"{sorted(theirs - ours) or '-'}; only edgeconv: {sorted(ours - theirs) or '-'}")
            return
        if vendored_source() is None:
            llama_cpp_tools.source()  # pip download + unpack of the llama-cpp-python sdist
        cases = generate(work, args.case)
        before = json.loads(RESULTS.read_text())["cases"] if RESULTS.exists() and args.case else {}
        data = {
            "what": "GGUF key-value names written by llama.cpp's convert_hf_to_gguf.py --outtype f16 on the cases of "
                    "benchmarks/gguf_keys.py (python benchmarks/gguf_keys.py regenerates this file)",
            "llama_cpp": f"vendored in llama-cpp-python {llama_cpp_tools.VERSION}",
            "cases": dict(sorted({**before, **cases}.items())),
        }
        RESULTS.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {RESULTS} ({len(cases)} cases)")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
