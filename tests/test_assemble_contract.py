"""The stage contract: manifest with real hashes, rerun skips, loads as the stated dense class, counts add up."""

import hashlib
import json
import os

import pytest
import tiny
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from edgeconv.errors import EdgeconvError
from edgeconv.families import FAMILIES, family_for
from edgeconv.io.checkpoint import Checkpoint, resolve_model_path
from edgeconv.planning.calibration_free import simple_plan
from edgeconv.planning.model_info import inspect_model
from edgeconv.planning.plan import Plan
from edgeconv.registry import Registry
from edgeconv.stages.assemble import assemble


@pytest.fixture(scope="module")
def assembled(qwen3_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("contract") / "dense"
    plan = simple_plan(family_for(tiny.config_of(qwen3_dir)), "first:2")
    # A small shard cap forces several shards, so the index is exercised.
    result = assemble(qwen3_dir, plan, out, max_shard_bytes=20_000, progress=False)
    return result, plan


def test_manifest_hashes_every_file(assembled):
    result, _ = assembled
    files = result.manifest["files"]
    on_disk = {p.name for p in result.out.iterdir()} - {"manifest.json"}
    assert set(files) == on_disk
    for name, entry in files.items():
        data = (result.out / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
    assert {"model_fingerprint", "plan_sha256"} <= set(result.manifest["inputs"])
    assert result.manifest["edgeconv_version"]


def test_output_is_sharded_with_index_and_tokenizer_side_files(assembled, qwen3_dir):
    result, _ = assembled
    shards = sorted(result.out.glob("model-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((result.out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert (result.out / "generation_config.json").read_bytes() == (qwen3_dir / "generation_config.json").read_bytes()


def test_loads_as_stock_dense_class_without_remote_code(assembled):
    result, _ = assembled
    config = AutoConfig.from_pretrained(result.out, trust_remote_code=False)
    assert config.architectures == ["Qwen3ForCausalLM"] and config.intermediate_size == 32
    model = AutoModelForCausalLM.from_pretrained(result.out, trust_remote_code=False)
    assert type(model).__name__ == "Qwen3ForCausalLM"


def test_rerun_skips_and_changed_plan_is_refused(assembled, qwen3_dir):
    result, plan = assembled
    before = {p.name: os.stat(p).st_mtime_ns for p in result.out.iterdir()}
    again = assemble(qwen3_dir, plan, result.out, max_shard_bytes=20_000, progress=False)
    assert again.skipped and again.manifest["key"] == result.manifest["key"]
    assert {p.name: os.stat(p).st_mtime_ns for p in result.out.iterdir()} == before
    other = simple_plan(family_for(tiny.config_of(qwen3_dir)), "ids:3,4")
    with pytest.raises(EdgeconvError, match="another edgeconv assemble output"):
        assemble(qwen3_dir, other, result.out, max_shard_bytes=20_000, progress=False)


def test_damaged_output_of_the_same_run_is_rebuilt_not_skipped(qwen3_dir, tmp_path):
    plan = simple_plan(family_for(tiny.config_of(qwen3_dir)), "first:2")
    first = assemble(qwen3_dir, plan, tmp_path / "d", progress=False)
    shard = next((tmp_path / "d").glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-10])
    again = assemble(qwen3_dir, plan, tmp_path / "d", progress=False)
    assert not again.skipped and again.manifest["files"] == first.manifest["files"]


def test_stale_temp_dir_of_a_killed_run_is_cleaned(qwen3_dir, tmp_path):
    stale = tmp_path / ".d.edgeconv-tmp-999999999"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"half")
    plan = simple_plan(family_for(tiny.config_of(qwen3_dir)), "first:2")
    assemble(qwen3_dir, plan, tmp_path / "d", progress=False)
    assert not stale.exists()


def test_plan_roundtrip(assembled, tmp_path):
    _, plan = assembled
    plan.save(tmp_path / "p.json")
    loaded = Plan.load(tmp_path / "p.json")
    assert loaded == plan
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["format"] == "edgeconv-plan" and data["version"] == 1
    assert data["layers"][0]["groups"][0] == {"experts": [0], "weights": [1.0], "scale": 0.5}


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_inspect_counts_match_the_real_models(arch, random_checkpoints, tmp_path):
    model, src = random_checkpoints[arch]
    info = inspect_model(src)
    family = family_for(tiny.config_of(src))
    assert info.total_params == sum(p.numel() for p in model.parameters())
    assert (info.num_experts, info.top_k, info.moe_layers) == (tiny.E, 2, len(family.moe_layers()))
    per_expert = sum(p.numel() for p in _one_expert(model, arch, family))
    inactive = len(family.moe_layers()) * (tiny.E - 2) * per_expert
    assert info.active_params == info.total_params - inactive
    result = assemble(src, simple_plan(family), tmp_path / "d", progress=False)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "d")
    assert (info.default_dense_params == sum(p.numel() for p in dense.parameters())
            == result.manifest["summary"]["dense_params"])
    assert info.default_dense_width == dense.config.intermediate_size


def _one_expert(model, arch, family):
    layer = model.model.layers[family.moe_layers()[0]]
    block = getattr(layer, "block_sparse_moe", None) or layer.mlp
    if arch == "GptOssForCausalLM":  # fused: one expert's share of each fused tensor
        return [p[0] for p in block.experts.parameters()]
    return list(block.experts[0].parameters())


def test_every_family_is_registered_and_builds_its_dense_config(uniform_checkpoints):
    assert set(FAMILIES.names()) == set(tiny.ARCHS)
    for arch, path in uniform_checkpoints.items():
        family = FAMILIES.get(arch)(tiny.config_of(path))
        config = family.dense_config(64)
        assert config["architectures"] == [family.dense_architecture]
        AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})


def test_registry_refuses_duplicates_and_suggests():
    reg = Registry("scorer")
    reg.register("do-acp")(object())
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("do-acp")(object())
    with pytest.raises(EdgeconvError, match="did you mean 'do-acp'.*known scorers: do-acp"):
        reg.get("do_acp")


def test_reading_one_expert_row_equals_slicing_the_full_tensor(random_checkpoints, tmp_path):
    fused = tiny.fuse_experts(random_checkpoints["Qwen3MoeForCausalLM"][1], tmp_path / "fused")
    ckpt = Checkpoint(fused)
    name = "model.layers.1.mlp.experts.gate_up_proj"
    full = ckpt.read(name)
    for e in (0, 5, 7):
        assert torch.equal(ckpt.read(name, e), full[e])


def test_hub_id_resolves_from_the_local_cache_without_network(qwen3_dir, tmp_path, monkeypatch):
    """A hub id found in the local HF cache is used as is (no network here)."""
    import shutil

    from huggingface_hub import constants

    snap = tmp_path / "hub" / "models--acme--tiny-moe" / "snapshots" / ("a" * 40)
    shutil.copytree(qwen3_dir, snap)
    (tmp_path / "hub" / "models--acme--tiny-moe" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-moe" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("acme/tiny-moe") == snap
    assert inspect_model("acme/tiny-moe").architecture == "Qwen3MoeForCausalLM"


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_adapter_reads_router_from_files(arch, random_checkpoints):
    model, src = random_checkpoints[arch]
    family = family_for(tiny.config_of(src))
    ckpt = Checkpoint(src)
    layer = family.moe_layers()[-1]
    block = getattr(model.model.layers[layer], "block_sparse_moe", None) or model.model.layers[layer].mlp
    router = getattr(block, "router", None) or block.gate
    weight, bias = family.read_router(ckpt, layer)
    assert torch.equal(weight, router.weight.detach())
    assert (bias is None) == (getattr(router, "bias", None) is None)


def test_assemble_reads_only_the_kept_experts(random_checkpoints, tmp_path, monkeypatch):
    """Lazy by construction: the experts a plan drops are never read from disk."""
    from edgeconv.io import safetensors_reader

    src = random_checkpoints["Qwen3MoeForCausalLM"][1]
    seen = []
    real = safetensors_reader.ShardFile.read
    monkeypatch.setattr(safetensors_reader.ShardFile, "read", lambda self, n, *a: seen.append(n) or real(self, n, *a))
    assemble(src, simple_plan(family_for(tiny.config_of(src)), "ids:2,5"), tmp_path / "d", progress=False)
    experts_read = {int(n.split(".experts.")[1].split(".")[0]) for n in seen if ".experts." in n}
    assert experts_read == {2, 5}
    assert not any(n.endswith("mlp.gate.weight") for n in seen)  # the router is not needed to assemble


def test_tokenizer_is_copied_and_loads(qwen3_dir, tmp_path):
    """A locally trained BPE tokenizer travels with the weights and loads with AutoTokenizer."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    src = tmp_path / "with_tok"
    shutil.copytree(qwen3_dir, src)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=96, special_tokens=["<unk>", "<eos>"])
    tok.train_from_iterator(["to be or not to be, that is the question"] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(src)
    assemble(src, simple_plan(family_for(tiny.config_of(src))), tmp_path / "d", progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "d" / name).read_bytes() == (src / name).read_bytes()
    a, b = AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(tmp_path / "d")
    assert a("that is the question").input_ids == b("that is the question").input_ids
