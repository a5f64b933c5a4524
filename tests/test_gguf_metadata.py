"""GGUF metadata as complete as llama.cpp's converter writes it (issue 20).

Every key llama.cpp's convert_hf_to_gguf.py writes on the cases of benchmarks/gguf_keys.py (the demo models, the six
released MoE shapes at tiny widths and their dense students, a hub snapshot with a model card and sampling
defaults) is one edgeconv writes; the recorded list is checked against the converter itself where its source is
unpacked. Then the values of the lineage keys of the GGUF spec (general.base_model.*, general.license) and the
importance-matrix keys llama-quantize writes.
"""

import json
import sys
from pathlib import Path

import gguf
import pytest
import tiny

from edgeconv.export.gguf import llamacpp
from edgeconv.export.gguf.writer import plan_gguf
from edgeconv.families import family_for
from edgeconv.planning.calibration_free import simple_plan
from edgeconv.stages.assemble import assemble
from edgeconv.stages.export_gguf import IMATRIX_SOURCE, export_gguf

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
RECORDED = BENCH / "results" / "gguf_upstream_keys.json"
# Keys llama.cpp's converter writes that edgeconv does not, each with the reason. Empty: every key it writes on
# these cases is written. (Only-edgeconv keys are allowed: e.g. attention.key_length, which upstream leaves to
# llama.cpp's default of hidden / heads and edgeconv writes explicitly.)
NOT_WRITTEN: dict[str, str] = {}
# The cases whose upstream keys are regenerated here when llama.cpp's source is unpacked (each run of the converter
# costs seconds; `python benchmarks/gguf_keys.py` regenerates them all): the ones that depend on model cards.
RECHECKED = ["hub", "hub-student"]


@pytest.fixture(scope="module")
def gk():
    sys.path.insert(0, str(BENCH))
    try:
        import gguf_keys
    finally:
        sys.path.remove(str(BENCH))
    return gguf_keys


@pytest.fixture(scope="module")
def cases(gk, tmp_path_factory):
    return gk.make_cases(tmp_path_factory.mktemp("gguf-key-cases"))


def general(model_dir: Path, name: str | None = None) -> dict:
    """The key-values edgeconv declares for `model_dir` (no tensor data written)."""
    plan = plan_gguf(Path(model_dir), "F16", name=name)
    try:
        return {k: v.value for k, v in plan.writer.kv_data[0].items()}
    finally:
        plan.close()


def test_every_key_upstreams_converter_writes_is_written(gk, cases):
    recorded = json.loads(RECORDED.read_text())["cases"]
    assert set(recorded) == set(cases), "benchmarks/gguf_keys.py's cases changed: run it to record upstream's keys"
    missing = {}
    for name, path in cases.items():
        gap = set(recorded[name]) - gk.edgeconv_keys(path) - set(NOT_WRITTEN)
        if gap:
            missing[name] = sorted(gap)
    assert not missing, f"keys llama.cpp's converter writes and edgeconv does not: {missing}"
    # What the issue named, on the cases that have it.
    keys = {name: gk.edgeconv_keys(path) for name, path in cases.items()}
    for name in cases:
        assert {"general.type", "general.size_label", "general.quantization_version"} <= keys[name], name
    assert "qwen3moe.feed_forward_length" in keys["demo-moe"]
    assert "qwen2moe.feed_forward_length" in keys["qwen1.5-moe-a2.7b"]
    assert "general.finetune" in keys["hub-student"] and "general.finetune" in keys["hub"]


def test_recorded_upstream_keys_are_what_the_converter_writes(gk, cases, tmp_path):
    if gk.vendored_source() is None:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py is not unpacked under benchmarks/_work "
                    "(python benchmarks/gguf_keys.py fetches the llama-cpp-python sdist and records the keys)")
    recorded = json.loads(RECORDED.read_text())["cases"]
    for name in RECHECKED:
        assert sorted(gk.upstream_keys(cases[name], tmp_path)) == recorded[name], (
            f"{name}: llama.cpp's converter now writes other keys; run python benchmarks/gguf_keys.py")


def test_lineage_of_a_student_of_a_hub_teacher(cases):
    kv = general(cases["hub-student"])
    # The teacher came from the hub (a snapshot in the HF cache): named as upstream names a card's hub id.
    assert kv["general.base_model.count"] == 1
    assert kv["general.base_model.0.name"] == "Qwen3 30B A3B"
    assert kv["general.base_model.0.organization"] == "Qwen"
    assert kv["general.base_model.0.repo_url"] == "https://huggingface.co/Qwen/Qwen3-30B-A3B"
    assert kv["general.license"] == "apache-2.0"  # the teacher's card, carried by the student's card
    assert kv["general.finetune"] == "dense" and kv["general.name"] == "hub-student"
    assert kv["general.type"] == "model" and kv["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    assert "moe-to-dense" in kv["general.tags"]
    # The teacher itself: its own card's lineage, as upstream reads it, and its hub id as its name.
    teacher = general(cases["hub"])
    assert teacher["general.name"] == "Qwen/Qwen3-30B-A3B" and teacher["general.organization"] == "Qwen"
    assert teacher["general.base_model.0.repo_url"] == "https://huggingface.co/Qwen/Qwen3-30B-A3B-Base"
    assert teacher["general.sampling.top_k"] == 20 and teacher["general.languages"] == ["en"]
    assert teacher["general.license"] == "apache-2.0"


def test_lineage_of_a_student_of_a_local_teacher(cases):
    kv = general(cases["qwen3-30b-a3b-student"], name="my-student")
    assert kv["general.name"] == "my-student"
    assert kv["general.base_model.count"] == 1 and kv["general.base_model.0.name"] == "qwen3-30b-a3b"
    # A directory is no hub repo: nothing to name as its organization or URL. Its config or card has no license.
    assert not any(k.startswith("general.base_model.0.") and k != "general.base_model.0.name" for k in kv)
    assert "general.license" not in kv
    # The shipped demo teacher's card declares its license.
    assert general(cases["demo-moe"])["general.license"] == "apache-2.0"
    assert general(cases["qwen3-30b-a3b"])["qwen3moe.feed_forward_length"] == 64  # the shape's intermediate_size


def test_importance_matrix_keys_as_llama_quantize_writes_them(tmp_path):
    teacher = tiny.add_tokenizer(tiny.save(tiny.build_model("Qwen3MoeForCausalLM", seed=5), tmp_path / "moe"))
    student = tmp_path / "dense"
    assemble(teacher, simple_plan(family_for(tiny.config_of(teacher)), "ids:0,3"), student, progress=False)
    corpus = tiny.write_corpus(tmp_path / "imatrix-text.jsonl")
    result = export_gguf(student, tmp_path / "q.gguf", "Q4_K_M", imatrix_data=corpus, imatrix_tokens=512)
    fields = gguf.GGUFReader(result.path).fields
    entries = result.info["imatrix"]["tensors"]
    assert fields[llamacpp.IMATRIX_FILE].contents() == IMATRIX_SOURCE
    assert fields[llamacpp.IMATRIX_DATASET].contents() == "imatrix-text.jsonl"
    assert fields[llamacpp.IMATRIX_ENTRIES].contents() == entries >= 14  # q, k, v, o, gate, up, down x 2 layers
    assert fields[llamacpp.IMATRIX_CHUNKS].contents() == 2  # 512 tokens in sequences of 256: llama-imatrix's chunks
    for key in (llamacpp.IMATRIX_ENTRIES, llamacpp.IMATRIX_CHUNKS):  # llama-quantize's INT overrides are uint32
        assert fields[key].types == [gguf.GGUFValueType.UINT32]
    assert fields["general.base_model.0.name"].contents() == "moe"
    assert fields["general.quantization_version"].contents() == gguf.GGML_QUANT_VERSION
    # Without an importance matrix, none of them.
    plain = export_gguf(student, tmp_path / "plain.gguf", "Q4_K_M")
    assert not [k for k in gguf.GGUFReader(plain.path).fields if k.startswith("quantize.imatrix.")]
