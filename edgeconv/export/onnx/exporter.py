"""ONNX knowledge: which architectures optimum-onnx can export (and the MoE patches it lacks), onnxruntime's
quantizers, the onnxruntime-genai model builder, and runners that return logits for the parity check.

optimum-onnx registers qwen3, qwen3_moe, qwen2, mistral and gpt_oss; qwen2_moe, mixtral and olmoe get an
ONNX config here whose patcher swaps the sparse MoE block's forward for one that loops over every expert
(the stock forward loops over the experts hit at trace time only, which bakes the trace's routing into the
graph). DeepSeek-V2 (multi-head latent attention; teachers and their all-dense students) gets an ONNX config
whose KV cache has keys of width qk_nope + qk_rope and values of width v_head_dim per head, and whose patcher
also swaps transformers' complex-valued rotary embedding (which the ONNX exporter cannot trace) for the same
rotation done with real cos/sin.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from edgeconv.errors import EdgeconvError
from edgeconv.families.base import routed_experts
from edgeconv.quant import get_quant

GENAI_PROVIDERS = ("cpu", "cuda")
INT4_BLOCK = 32

# model_type -> the architectures exported through optimum-onnx (teachers and dense students alike).
OPTIMUM_BUILTIN = {"qwen3", "qwen3_moe", "qwen2", "mistral", "gpt_oss"}
OPTIMUM_PATCHED = {"qwen2_moe", "mixtral", "olmoe", "deepseek_v2", "glm4_moe"}
ONNX_MODEL_TYPES = sorted(OPTIMUM_BUILTIN | OPTIMUM_PATCHED)
# onnxruntime-genai 0.15's builder: HF architecture -> its builder class (dense students only).
GENAI_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "GptOssForCausalLM")
# onnxruntime's CPU GroupQueryAttention kernel (used by every genai graph) needs this.
GENAI_HEAD_DIM_MULTIPLE = 16


def model_type_of(config: dict) -> str:
    return config.get("model_type") or "<none>"


def check_onnx_supported(config: dict, where: str = "the model") -> str:
    mt = model_type_of(config)
    arch = (config.get("architectures") or [mt])[0]
    if mt not in OPTIMUM_BUILTIN | OPTIMUM_PATCHED:
        raise EdgeconvError(
            f"ONNX export does not support {arch} ({mt})",
            f"supported model types: {', '.join(ONNX_MODEL_TYPES)}; try --format gguf",
        )
    return mt


# --- optimum-onnx export -------------------------------------------------------------------------------


def moe_forward_all_experts(self, hidden_states):
    """Sparse MoE forward that visits every expert (an expert no token picked gets an empty batch), with the
    routing of Qwen2-MoE (plus its gated shared expert), Mixtral and OLMoE. Same maths as transformers'."""
    import torch
    import torch.nn.functional as F

    batch_size, sequence_length, hidden_dim = hidden_states.shape
    hidden_states = hidden_states.view(-1, hidden_dim)
    router_logits = self.gate(hidden_states)
    routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
    routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
    if getattr(self, "norm_topk_prob", True):  # Mixtral always normalizes (no flag)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
    routing_weights = routing_weights.to(hidden_states.dtype)
    final = torch.zeros((batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype,
                        device=hidden_states.device)
    expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
    for expert_idx in range(self.num_experts):
        idx, top_x = torch.where(expert_mask[expert_idx])
        current = hidden_states[top_x]
        out = self.experts[expert_idx](current) * routing_weights[top_x, idx, None]
        final.index_add_(0, top_x, out.to(hidden_states.dtype))
    if getattr(self, "shared_expert", None) is not None:
        shared = self.shared_expert(hidden_states)
        final = final + torch.sigmoid(self.shared_expert_gate(hidden_states)) * shared
    return final.reshape(batch_size, sequence_length, hidden_dim), router_logits


def deepseek_v2_moe_forward_all_experts(self, hidden_states):
    """DeepseekV2MoE's forward visiting every routed expert, with transformers' routing (softmax scores in
    fp32, top-k greedy or group-limited greedy, weights * routed_scaling_factor, no renormalisation) plus the
    shared experts, added unweighted."""
    import torch
    import torch.nn.functional as F

    gate = self.gate
    orig_shape = hidden_states.shape
    flat = hidden_states.reshape(-1, orig_shape[-1])
    scores = F.linear(flat.float(), gate.weight.float()).softmax(dim=-1, dtype=torch.float32)
    if gate.topk_method == "group_limited_greedy":
        n = flat.shape[0]
        group_scores = scores.view(n, gate.num_group, -1).max(dim=-1).values
        group_idx = torch.topk(group_scores, k=gate.topk_group, dim=-1)[1]
        group_mask = torch.zeros_like(group_scores).scatter(1, group_idx, 1.0)
        score_mask = group_mask.unsqueeze(-1).expand(n, gate.num_group, gate.num_experts // gate.num_group)
        scores = scores.masked_fill(score_mask.reshape(n, -1) == 0, 0.0)
    elif gate.topk_method != "greedy":
        raise NotImplementedError(f"DeepSeek-V2 topk_method {gate.topk_method!r}")
    topk_weight, topk_idx = torch.topk(scores, k=gate.top_k, dim=-1)
    topk_weight = topk_weight * gate.routed_scaling_factor
    final = torch.zeros((flat.shape[0], orig_shape[-1]), dtype=topk_weight.dtype, device=flat.device)
    expert_mask = F.one_hot(topk_idx, num_classes=len(self.experts)).permute(2, 1, 0)
    for expert_idx in range(len(self.experts)):
        idx, top_x = torch.where(expert_mask[expert_idx])
        out = self.experts[expert_idx](flat[top_x]).to(topk_weight.dtype) * topk_weight[top_x, idx, None]
        final.index_add_(0, top_x, out)
    out = final.to(hidden_states.dtype).view(*orig_shape)
    return out + self.shared_experts(hidden_states)


def deepseek_v2_rotary_forward(self, x, position_ids):
    """DeepseekV2RotaryEmbedding's forward returning real (cos, sin) stacked on a last axis of 2, scaled like
    transformers' complex freqs_cis (its real and imaginary parts), instead of a complex tensor."""
    import torch

    inv_freq = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1).to(x.device)
    freqs = (inv_freq @ position_ids[:, None, :].float()).transpose(1, 2)
    return torch.stack((freqs.cos(), freqs.sin()), dim=-1) * self.attention_scaling


def deepseek_v2_apply_rotary_emb(xq, xk, freqs_cis):
    """transformers' apply_rotary_emb without complex numbers: each pair (x[2i], x[2i+1]) is rotated by the
    angle of frequency i (freqs_cis from deepseek_v2_rotary_forward: [batch, seq, dim // 2, 2])."""
    import torch

    cos, sin = freqs_cis[..., 0].unsqueeze(1), freqs_cis[..., 1].unsqueeze(1)  # [batch, 1, seq, dim // 2]

    def rotate(x):
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        re, im = pairs[..., 0], pairs[..., 1]
        out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1)
        return out.flatten(3).type_as(x)

    return rotate(xq), rotate(xk)


def glm4_moe_experts_all(self, hidden_states, topk_indices, topk_weights):
    """Glm4MoeMoE.moe visiting every routed expert (the stock loop skips experts no token picked at trace
    time, which would bake the trace's routing into the graph). Same maths as transformers'."""
    import torch

    final = torch.zeros_like(hidden_states, dtype=topk_weights.dtype)
    expert_mask = torch.nn.functional.one_hot(topk_indices, num_classes=len(self.experts)).permute(2, 0, 1)
    for expert_idx, expert in enumerate(self.experts):
        token_indices, weight_indices = torch.where(expert_mask[expert_idx])
        out = expert(hidden_states[token_indices]) * topk_weights[token_indices, weight_indices].unsqueeze(-1)
        final.index_add_(0, token_indices, out)
    return final.type(hidden_states.dtype)


def _moe_block_class(model_type: str):
    if model_type == "qwen2_moe":
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock as block
    elif model_type == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as block
    else:
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as block
    return block


def _custom_onnx_config(model_type: str, hf_config):
    """An optimum OnnxConfig (text-generation with past) for the MoE families optimum does not register."""
    from optimum.exporters.onnx import model_configs as mc
    from optimum.exporters.onnx.model_patcher import ModelPatcher

    if model_type == "deepseek_v2":
        return _deepseek_v2_onnx_config(hf_config)
    if model_type == "glm4_moe":
        return _glm4_moe_onnx_config(hf_config)
    block = _moe_block_class(model_type)

    class AllExpertsPatcher(ModelPatcher):
        def __enter__(self):
            super().__enter__()
            self._orig_forward = block.forward
            block.forward = moe_forward_all_experts

        def __exit__(self, exc_type, exc_value, traceback):
            super().__exit__(exc_type, exc_value, traceback)
            block.forward = self._orig_forward

    base = {"qwen2_moe": mc.Qwen2OnnxConfig, "mixtral": mc.MistralOnnxConfig, "olmoe": mc.LlamaOnnxConfig}[model_type]
    cls = type(f"{block.__name__}OnnxConfig", (base,), {"_MODEL_PATCHER": AllExpertsPatcher})
    return cls(hf_config, task="text-generation", use_past=True, use_past_in_inputs=True)


def _glm4_moe_onnx_config(hf_config):
    """GLM-4-MoE (the `edgeconv upcycle` container, Qwen3 attention): optimum's Qwen3 config (GQA, head_dim)
    with a patcher whose expert loop visits every expert."""
    from optimum.exporters.onnx import model_configs as mc
    from optimum.exporters.onnx.model_patcher import ModelPatcher
    from transformers.models.glm4_moe import modeling_glm4_moe as glm

    class Glm4MoePatcher(ModelPatcher):
        def __enter__(self):
            super().__enter__()
            self._orig = glm.Glm4MoeMoE.moe
            glm.Glm4MoeMoE.moe = glm4_moe_experts_all

        def __exit__(self, exc_type, exc_value, traceback):
            super().__exit__(exc_type, exc_value, traceback)
            glm.Glm4MoeMoE.moe = self._orig

    cls = type("Glm4MoeOnnxConfig", (mc.Qwen3OnnxConfig,), {"_MODEL_PATCHER": Glm4MoePatcher})
    return cls(hf_config, task="text-generation", use_past=True, use_past_in_inputs=True)


def _deepseek_v2_onnx_config(hf_config):
    """DeepSeek-V2: optimum's DeepSeek-V3 config (Llama inputs + position_ids; its dummy cache has keys of
    qk_nope + qk_rope and values of v_head_dim per head, one "kv head" per attention head, as transformers'
    deepseek_v2 caches them) with a patcher for the complex rotary embedding and the MoE block."""
    from optimum.exporters.onnx import model_configs as mc
    from optimum.exporters.onnx.model_patcher import ModelPatcher
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as ds

    patches = [
        (ds, "apply_rotary_emb", deepseek_v2_apply_rotary_emb),
        (ds.DeepseekV2RotaryEmbedding, "forward", deepseek_v2_rotary_forward),
        (ds.DeepseekV2MoE, "forward", deepseek_v2_moe_forward_all_experts),
    ]

    class DeepseekV2Patcher(ModelPatcher):
        def __enter__(self):
            super().__enter__()
            self._saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
            for owner, name, new in patches:
                setattr(owner, name, new)

        def __exit__(self, exc_type, exc_value, traceback):
            super().__exit__(exc_type, exc_value, traceback)
            for owner, name, old in self._saved:
                setattr(owner, name, old)

    cls = type("DeepseekV2OnnxConfig", (mc.DeepSeekV3OnnxConfig,), {"_MODEL_PATCHER": DeepseekV2Patcher})
    return cls(hf_config, task="text-generation", use_past=True, use_past_in_inputs=True)


def optimum_export(model_dir: Path, out_dir: Path) -> None:
    """model.onnx (+ model.onnx_data when large), config.json and the tokenizer, fp32, KV cache in/out."""
    import logging

    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers qwen3, qwen3_moe, gpt_oss, ...)
    from optimum.exporters.onnx import main_export
    from transformers import AutoConfig

    config = json.loads((model_dir / "config.json").read_text())
    mt = check_onnx_supported(config)
    custom = None
    if mt in OPTIMUM_PATCHED:
        custom = {"model": _custom_onnx_config(mt, AutoConfig.from_pretrained(model_dir))}
    logging.getLogger("optimum").setLevel(logging.ERROR)
    try:
        main_export(str(model_dir), out_dir, task="text-generation-with-past", device="cpu", local_files_only=True,
                    do_validation=False, custom_onnx_configs=custom, library_name="transformers")
    except EdgeconvError:
        raise
    except Exception as exc:  # optimum/torch.onnx raise plain exceptions; keep the cause, one line
        raise EdgeconvError(f"optimum-onnx could not export {model_dir.name}: {type(exc).__name__}: {exc}",
                            "report it with the model's config.json") from exc
    if not (out_dir / "model.onnx").is_file():
        raise EdgeconvError(f"optimum-onnx wrote no model.onnx for {model_dir.name}", "report it")


# --- onnxruntime quantization / fp16 ---------------------------------------------------------------------


def _large(path: Path) -> bool:
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*")) > 1_800_000_000


def _remove_model(path: Path) -> None:
    for f in path.parent.glob(path.name + "*"):  # model.onnx and model.onnx_data
        f.unlink()


def convert_precision(model_path: Path, precision: str) -> dict:
    """Rewrite model.onnx (fp32) in place as `precision`; returns what was done (for parity.json)."""
    get_quant("onnx", precision)  # an unknown name: refused with the known ones, before any file moves
    if precision == "fp32":
        return {}
    work = model_path.with_name("fp32-" + model_path.name)
    for f in model_path.parent.glob(model_path.name + "*"):
        f.rename(f.with_name("fp32-" + f.name))
    large = _large(work)
    info: dict = {}
    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(work), str(model_path), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         use_external_data_format=large)
        info = {"method": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8", "ops": ["MatMul"]}
    elif precision == "int4":
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quant = MatMulNBitsQuantizer(onnx.load(str(work)), bits=4, block_size=INT4_BLOCK, is_symmetric=True)
        quant.process()
        quant.model.save_model_to_file(str(model_path), use_external_data_format=large)
        info = {"method": "MatMulNBitsQuantizer", "bits": 4, "block_size": INT4_BLOCK, "symmetric": True}
    elif precision == "fp16":
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(work)), keep_io_types=True)
        _save(model, model_path, large)
        info = {"method": "onnxruntime.transformers.float16", "keep_io_types": True}
    else:
        raise EdgeconvError(f"edgeconv.quant lists ONNX {precision} but convert_precision has no converter for it",
                            "a bug in edgeconv: pick another --quant")
    _remove_model(work)
    info["op_types"] = op_type_counts(model_path)
    return info


def _save(model, path: Path, large: bool) -> None:
    import onnx

    if large:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + "_data")
    else:
        onnx.save_model(model, str(path))


def op_type_counts(model_path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {k: counts[k] for k in sorted(counts)
            if k in ("MatMul", "MatMulInteger", "MatMulNBits", "DynamicQuantizeLinear", "Cast", "Gemm")}


# --- runners -------------------------------------------------------------------------------------------


def onnx_session(model_path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])


def onnx_logits(model: Path | object, token_ids: list[list[int]]) -> list[np.ndarray]:
    """Logits for each prompt from one prefill with empty past_key_values, as optimum exports the graph.
    `model` is the .onnx path or an open onnxruntime session."""
    session = onnx_session(model) if isinstance(model, (str, Path)) else model
    inputs = {i.name: i for i in session.get_inputs()}
    out = []
    for ids in token_ids:
        n = len(ids)
        feed = {"input_ids": np.array([ids], dtype=np.int64)}
        if "attention_mask" in inputs:
            feed["attention_mask"] = np.ones((1, n), dtype=np.int64)
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(n, dtype=np.int64)[None]
        for name, spec in inputs.items():
            if name.startswith("past_key_values"):
                shape = [1 if not isinstance(d, int) and "batch" in str(d) else (0 if not isinstance(d, int) else d)
                         for d in spec.shape]
                dtype = np.float16 if spec.type == "tensor(float16)" else np.float32
                feed[name] = np.zeros(shape, dtype=dtype)
        try:
            logits = session.run(["logits"], feed)[0]
        except Exception as exc:  # onnxruntime's errors are plain RuntimeErrors
            raise EdgeconvError(f"the exported model fails in onnxruntime on a {n}-token prompt: {exc}",
                                "nothing was published; report it with the model's config.json") from exc
        out.append(logits[0].astype(np.float32))
    return out


def genai_logits(model_dir: Path, token_ids: list[list[int]], provider: str = "cpu") -> list[np.ndarray]:
    """Logits for each prompt from onnxruntime-genai's own generator (one prefill per prompt). A CUDA build is
    checked on CUDA when this machine has it, on the CPU otherwise (same graph, CPU kernels)."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    if provider != "cpu" and not og.is_cuda_available():
        config.clear_providers()
    try:
        model = og.Model(config)
    except Exception as exc:
        raise EdgeconvError(f"onnxruntime-genai cannot load the built model: {exc}",
                            "nothing was published") from exc
    context = json.loads((model_dir / "genai_config.json").read_text())["model"]["context_length"]
    out = []
    for ids in token_ids:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=min(len(ids) + 1, context))
        try:
            generator = og.Generator(model, params)
            generator.append_tokens(np.array(ids, dtype=np.int32))
        except Exception as exc:
            raise EdgeconvError(f"the built model fails in onnxruntime-genai on a {len(ids)}-token prompt: {exc}",
                                "nothing was published") from exc
        out.append(np.array(generator.get_output("logits"))[0].astype(np.float32))
        del generator
    return out


# --- onnxruntime-genai model builder -------------------------------------------------------------------


def check_genai_supported(config: dict, where: str = "the model") -> None:
    arch = (config.get("architectures") or [model_type_of(config)])[0]
    if routed_experts(config) > 1:
        raise EdgeconvError(
            f"the onnxruntime-genai export is for dense students; {where} is a MoE "
            f"({arch}, {routed_experts(config)} experts)",
            "export the MoE teacher with --format onnx, or pass the dense student",
        )
    if arch not in GENAI_ARCHITECTURES:
        raise EdgeconvError(
            f"onnxruntime-genai's model builder does not support {arch}",
            f"supported: {', '.join(GENAI_ARCHITECTURES)}; use --format onnx (onnxruntime) or gguf instead",
        )
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head_dim % GENAI_HEAD_DIM_MULTIPLE:
        raise EdgeconvError(
            f"head dimension {head_dim} of {where} is not a multiple of {GENAI_HEAD_DIM_MULTIPLE}, which "
            "onnxruntime's GroupQueryAttention kernel requires",
            "use --format onnx (plain onnxruntime) for this model",
        )


def genai_build(model_dir: Path, out_dir: Path, precision: str, provider: str, cache_dir: Path) -> str:
    """Run the builder in a subprocess (it prints a lot and reads the model itself), from the local directory
    only: HF_HUB_OFFLINE is set so nothing is fetched from a hub. Returns its log."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out_dir),
           "-p", precision, "-e", provider, "-c", str(cache_dir)]
    if precision == "int4":
        cmd += ["--extra_options", f"int4_block_size={INT4_BLOCK}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0 or not (out_dir / "genai_config.json").is_file():
        last = [line for line in log.strip().splitlines() if line.strip()][-1:] or ["no output"]
        raise EdgeconvError(f"onnxruntime-genai's builder failed on {model_dir.name}: {last[0][:300]}",
                            "see the builder's message; nothing was published")
    _fill_token_ids(model_dir, out_dir / "genai_config.json")
    return log


def _fill_token_ids(model_dir: Path, genai_config: Path) -> None:
    """The builder copies bos/eos/pad from config.json and writes null when they are absent there, which
    onnxruntime-genai then refuses to parse; take them from generation_config.json or the tokenizer."""
    cfg = json.loads(genai_config.read_text())
    model = cfg["model"]
    missing = [k for k in ("bos_token_id", "eos_token_id", "pad_token_id") if model.get(k) is None]
    if not missing:
        return
    known: dict = {}
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        known = {k: v for k, v in json.loads(gen.read_text()).items() if k.endswith("token_id") and v is not None}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if known.get(key) is None and getattr(tok, key, None) is not None:
            known[key] = getattr(tok, key)
    eos = known.get("eos_token_id")
    if eos is None:
        raise EdgeconvError(f"{model_dir.name} names no end-of-sequence token (config, generation config or tokenizer)",
                            "set eos_token_id in its config.json")
    defaults = {"eos_token_id": eos, "bos_token_id": eos, "pad_token_id": eos if isinstance(eos, int) else eos[0]}
    for key in missing:
        model[key] = known.get(key, defaults[key])
    genai_config.write_text(json.dumps(cfg, indent=4) + "\n")


# --- tokenizer -----------------------------------------------------------------------------------------


def fix_tokenizer_inputs(out_dir: Path) -> None:
    """Generation takes input_ids and attention_mask only: record that in tokenizer_config.json so the
    tokenizer never hands token_type_ids to an ONNX session or to generate()."""
    path = out_dir / "tokenizer_config.json"
    if not path.is_file():
        raise EdgeconvError(f"no tokenizer was written to {out_dir}", "the model directory needs its tokenizer files")
    cfg = json.loads(path.read_text())
    cfg["model_input_names"] = ["input_ids", "attention_mask"]
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
