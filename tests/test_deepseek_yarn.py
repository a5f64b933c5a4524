"""DeepSeek-V2's YaRN softmax scale (edgeconv.compat): torch runs the released model's attention, so its GGUF matches
at every position, not only at the first (where a one-key softmax hides any scale)."""

import math

import numpy as np
import tiny

from edgeconv.compat import yarn_softmax_mscale
from edgeconv.export.parity import prompt_ids, torch_logits
from edgeconv.stages.export_gguf import export_gguf

LITE_YARN = {"type": "yarn", "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1,
             "original_max_position_embeddings": 4096}


def test_attention_takes_the_softmax_mscale():
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention

    config = tiny.tiny_config("DeepseekV2ForCausalLM")
    plain = DeepseekV2Attention(config, 0).scaling
    config.rope_scaling = dict(LITE_YARN)
    mscale = (0.1 * 0.707 * math.log(40) + 1) ** 2
    assert yarn_softmax_mscale(config) == mscale and round(mscale, 3) == 1.590
    assert DeepseekV2Attention(config, 0).scaling == plain * mscale


def test_gguf_matches_torch_at_every_position(tmp_path):
    """Every expert routed (no router ties to flip), so every position is held to the F32 tolerance and below."""
    src = tiny.add_tokenizer(tiny.save(tiny.build_model("DeepseekV2ForCausalLM", top_k=tiny.E, weight_std=0.4,
                                                        rope_scaling=dict(LITE_YARN), max_position_embeddings=163840),
                                       tmp_path / "ds"))
    result = export_gguf(src, tmp_path / "m.gguf", "F32")
    assert result.parity.passed
    from transformers import AutoTokenizer

    from edgeconv.export.gguf.llamacpp import LlamaRunner

    ids = prompt_ids(AutoTokenizer.from_pretrained(src))
    runner = LlamaRunner(result.path, n_ctx=max(len(i) for i in ids) + 8)
    try:
        got = [runner.logits(i) for i in ids]
    finally:
        runner.close()
    want = torch_logits(src, ids)
    worst = max(float(np.abs(g[1:] - w[1:]).max() / np.abs(w).max()) for g, w in zip(got, want, strict=True))
    # Measured: 1.2e-2 (tiny rope widths leave a small YaRN difference); without the softmax mscale 0.12-0.78 of the
    # largest logit from position 1 on.
    assert worst < 3e-2, worst
