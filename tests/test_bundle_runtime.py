"""Issue 20, points 6 and 7: a bundle's Ollama Modelfile carries the model's chat template (as Ollama's Go
template), its stop tokens and num_ctx from the target; a bundle's setup line and command come from its format's
runtime (llama-cpp-python, onnxruntime, onnxruntime-genai) and the execution provider its model was built for,
and its headline shows the parity figures of every format."""

import json
import shlex
import shutil
import subprocess
from types import SimpleNamespace

import pytest
import tiny
from huggingface_hub import ModelCard

from edgeconv.demo import EVAL_DATA
from edgeconv.device.bundle_runtime import genai_provider, launch
from edgeconv.device.memory_fit import Config, Estimate
from edgeconv.device.profiles import get_target, load_profile
from edgeconv.export.ollama import FAMILIES, INSTRUCTIONS, chat_format, tokenizer_chat
from edgeconv.families import family_for
from edgeconv.pipelines.build import headline
from edgeconv.planning.calibration_free import simple_plan
from edgeconv.stages.assemble import assemble
from edgeconv.stages.bundle import BundleStage

# Qwen2-MoE-Chat's template (ChatML, with its default system prompt).
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# One template of each family edgeconv translates, as the families' tokenizers carry them (abridged to the chat
# part), with the EOS token the tokenizer names.
JINJA = {
    "chatml": (CHATML, "<|endoftext|>"),
    "llama3": ("{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{{ content }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
               "<|eot_id|>"),
    "mistral": ("{% for message in messages %}{% if message['role'] == 'user' %}"
                "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                "{{ message['content'] + eos_token}}{% endif %}{% endfor %}", "</s>"),
    "deepseek2": ("{% for message in messages %}{% if message['role'] == 'user' %}"
                  "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
                  "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
                  "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}", "<｜end▁of▁sentence｜>"),
    "deepseek": ("{% set ns = namespace(system_prompt='') %}{% for message in messages %}"
                 "{% if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{% endif %}"
                 "{% endfor %}{{ ns.system_prompt }}{% for message in messages %}{% if message['role'] == 'user' %}"
                 "{{ '<｜User｜>' + message['content'] }}{% elif message['role'] == 'assistant' %}"
                 "{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}", "<｜end▁of▁sentence｜>"),
    "tulu": ("{% for message in messages %}\n{% if message['role'] == 'system' %}"
             "{{ '<|system|>\\n' + message['content'] }}\n{% elif message['role'] == 'user' %}"
             "{{ '<|user|>\\n' + message['content'] }}\n{% elif message['role'] == 'assistant' %}"
             "{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n{% endif %}\n"
             "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}\n{% endfor %}",
             "<|endoftext|>"),
    "harmony": ("{{ '<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\\n"
                "Knowledge cutoff: 2024-06\\n\\nReasoning: medium\\n\\n# Valid channels: analysis, commentary, "
                "final. Channel must be included for every message.<|end|>' }}{% for m in messages %}"
                "{% if m.role == 'system' %}{{ '<|start|>developer<|message|># Instructions\\n\\n' + m.content + "
                "'\\n\\n<|end|>' }}{% elif m.role == 'user' %}{{ '<|start|>user<|message|>' + m.content + '<|end|>' }}"
                "{% else %}{{ '<|start|>assistant<|channel|>final<|message|>' + m.content + '<|end|>' }}{% endif %}"
                "{% endfor %}{% if add_generation_prompt %}<|start|>assistant{% endif %}", "<|return|>"),
}
PARITY = {"kind": "onnx-genai:int4", "positions": 120, "max_abs_diff": 0.31, "max_abs_logit": 9.2, "rel_diff": 0.034,
          "top1_agreement": 0.975, "decisive_positions": 80, "ppl_artifact": 101.2, "ppl_torch": 100.0,
          "ppl_ratio": 1.012, "passed": True, "tolerance": {"ppl": 0.08}}


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    """A tiny dense student whose tokenizer has no chat template (a base model), and a copy of it whose tokenizer
    has Qwen2's ChatML template."""
    root = tmp_path_factory.mktemp("bundle-runtime")
    src = tiny.add_tokenizer(tiny.save(tiny.build_model("Qwen3MoeForCausalLM", seed=2), root / "tiny-moe"))
    (src / "README.md").write_text("---\nlicense: mit\n---\n\n# a tiny teacher\n")
    base = root / "base"
    assemble(src, simple_plan(family_for(tiny.config_of(src)), "ids:1,4"), base, progress=False)
    chat = root / "chat"
    shutil.copytree(base, chat)
    config = json.loads((chat / "tokenizer_config.json").read_text())
    (chat / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}, indent=2))
    return {"base": base, "chat": chat}


def bundle(tmp_path, student, fmt: str, target: str, provider: str = "cpu"):
    """BundleStage.run on a stand-in artifact of `fmt` (its bytes do not matter here) with its parity report."""
    export = tmp_path / "export"
    export.mkdir()
    quant = {"gguf": "Q4_K_M", "onnx": "int8", "onnx-genai": "int4"}[fmt]
    parity = {**PARITY, "kind": f"{fmt}:{quant}"}
    if fmt == "gguf":
        artifact = export / f"tiny-dense-{quant}.gguf"
        artifact.write_bytes(b"GGUF" + bytes(64))
        artifact.with_suffix(".parity.json").write_text(json.dumps(parity))
    else:
        artifact = export / "model"
        artifact.mkdir()
        (artifact / "model.onnx").write_bytes(bytes(64))
        if fmt == "onnx-genai":
            (artifact / "genai_config.json").write_text("{}")
            parity["execution_provider"] = provider
        (artifact / "parity.json").write_text(json.dumps(parity))
        (artifact / "manifest.json").write_text(json.dumps({"summary": {"parity_passed": True}}))
    profile = get_target(target) if isinstance(target, str) else target
    estimate = Estimate(Config(2, 32, fmt, quant, profile.context), 1_000_000, 600_000, 100_000, 50_000,
                        profile.usable_bytes)
    out = tmp_path / "bundle"
    out.mkdir()
    stage = BundleStage(out, name="tiny-dense", export=export, artifact=artifact, fmt=fmt, quant=quant, target=profile,
                        estimate=estimate, eval_data=EVAL_DATA, teacher="tiny-moe", student=student)
    return out, stage.run(out)


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(instruction, argument) per instruction; comments and blank lines skipped, \"\"\" blocks joined."""
    out, lines = [], iter(text.splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        instruction, _, arg = line.partition(" ")
        assert instruction.upper() in INSTRUCTIONS, f"not an Ollama instruction: {line!r}"
        if arg.startswith('"""'):
            block = arg[3:]
            while not block.endswith('"""'):
                block += "\n" + next(lines)  # StopIteration: an unterminated block fails the test
            arg = block[:-3]
        out.append((instruction.upper(), arg))
    return out


def parameters(parsed, name: str) -> list[str]:
    return [arg.split(" ", 1)[1] for ins, arg in parsed if ins == "PARAMETER" and arg.split(" ", 1)[0] == name]


@pytest.mark.parametrize("kind", ["base", "chat"])
def test_modelfile_parses_with_the_chat_template_stops_and_num_ctx(students, tmp_path, kind):
    out, fields = bundle(tmp_path, students[kind], "gguf", "jetson")
    text = (out / "Modelfile").read_text()
    parsed = parse_modelfile(text)
    assert all(len(line) <= 120 for line in text.splitlines() if line.startswith("#"))
    (source,) = [arg for ins, arg in parsed if ins == "FROM"]
    assert source == f"./{fields['model']}" and (out / source).is_file()  # FROM names the GGUF in the bundle
    assert parameters(parsed, "num_ctx") == [str(get_target("jetson").context)]  # the target's: 4096
    assert parameters(parsed, "num_thread") == [str(get_target("jetson").threads)]
    stops = [json.loads(s) for s in parameters(parsed, "stop")]
    templates = [arg for ins, arg in parsed if ins == "TEMPLATE"]
    if kind == "base":
        assert templates == [] and stops == ["<eos>"]  # the tokenizer's EOS
        assert "no chat template (a base model)" in text
    else:
        (template,) = templates
        assert "{{ range $i, $_ := .Messages }}" in template.replace("{{-", "{{") and "<|im_start|>" in template
        assert "{{ .Content }}" in template and "{{ .System }}" in template
        assert stops == ["<|im_start|>", "<|im_end|>", "<eos>"]
        assert [arg for ins, arg in parsed if ins == "SYSTEM"] == ["You are a helpful assistant."]
        assert "(ChatML) in Ollama's Go template syntax" in text


def test_an_untranslatable_template_leaves_a_comment(tmp_path):
    chat = chat_format("{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}{% endfor %}", ["</s>"])
    assert chat.template is None and chat.stops == ["</s>"] and "not one edgeconv translates" in chat.note


def test_tokenizer_chat_reads_the_template_and_eos_tokens(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHATML}],
        "eos_token": {"content": "<|im_end|>"}, "added_tokens_decoder": {"7": {"content": "<|endoftext|>"}}}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7]}))
    assert tokenizer_chat(tmp_path) == (CHATML, ["<|im_end|>", "<|endoftext|>"])


@pytest.mark.parametrize("family", [f.name for f in FAMILIES])
def test_every_family_is_recognized(family):
    jinja, eos = JINJA[family]
    chat = chat_format(jinja, [eos])
    assert chat.family == family and chat.template and eos in chat.stops and "{EOS}" not in chat.template


GO_RENDER = """package main

import ("encoding/json"; "os"; "strings"; "text/template")

type Message struct { Role string; Content string }

func main() {
\tsrc, _ := os.ReadFile(os.Args[1])
\traw, _ := os.ReadFile(os.Args[2])
\tvar msgs []Message
\tjson.Unmarshal(raw, &msgs)
\tvar system []string
\tfor _, m := range msgs { if m.Role == "system" { system = append(system, m.Content) } }
\tt := template.Must(template.New("").Option("missingkey=zero").Parse(string(src)))
\tvalues := map[string]any{"System": strings.Join(system, "\\n\\n"), "Messages": msgs}
\tif err := t.Execute(os.Stdout, values); err != nil {
\t\tpanic(err)
\t}
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="needs Go to run the templates as Ollama does")
def test_go_templates_render_what_the_jinja_templates_render(tmp_path):
    """Go's text/template, with the values Ollama gives a TEMPLATE (System: the system messages; Messages: all of
    them), renders what transformers' Jinja renders with add_generation_prompt."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    (tmp_path / "main.go").write_text(GO_RENDER)
    (tmp_path / "go.mod").write_text("module render\n\ngo 1.18\n")
    subprocess.run(["go", "build", "-o", "render", "."], cwd=tmp_path, check=True, capture_output=True)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders
    conversations = [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "2+2?"}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
    ]
    for family, (jinja, eos) in JINJA.items():
        chat = chat_format(jinja, [eos])
        (tmp_path / "t.gotmpl").write_text(chat.template)
        for messages in conversations:
            if family == "mistral" and messages[0]["role"] == "system":
                continue  # Mixtral's template has no system role
            want = env.from_string(jinja).render(messages=messages, add_generation_prompt=True, eos_token=eos,
                                                 bos_token="")
            if chat.system and messages[0]["role"] != "system":  # Ollama sends the Modelfile's SYSTEM
                messages = [{"role": "system", "content": chat.system}, *messages]
            (tmp_path / "m.json").write_text(json.dumps([{"Role": m["role"], "Content": m["content"]}
                                                         for m in messages]))
            got = subprocess.run([str(tmp_path / "render"), "t.gotmpl", "m.json"], cwd=tmp_path, check=True,
                                 capture_output=True, text=True).stdout
            assert got == want, (family, messages)


# --- point 7: the setup line and command come from the format's runtime ------------------------------------------

PACKAGES = {"gguf": "llama-cpp-python", "onnx": "onnxruntime", "onnx-genai": "onnxruntime-genai"}


def setup_line(card: str) -> str:
    """The first indented line after "Needs Python ...": the setup command."""
    lines = card.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("Needs Python"))
    return next(line.strip() for line in lines[at + 1:] if line.startswith("    "))


@pytest.mark.parametrize("fmt", ["gguf", "onnx", "onnx-genai"])
def test_the_setup_line_names_the_runtime_the_model_needs(students, tmp_path, fmt):
    out, fields = bundle(tmp_path, students["base"], fmt, "jetson")
    card = ModelCard.load(out / "README.md")
    setup = setup_line(card.text)
    package = shlex.split(setup)[-1]  # what pip installs
    assert package == PACKAGES[fmt], setup
    assert fields["bench"]["setup"] == setup and fields["runtime"] == {"gguf": "llama.cpp"}.get(fmt, PACKAGES[fmt])
    assert card.data.library_name == PACKAGES[fmt] and card.data.base_model == "tiny-moe"
    if fmt == "gguf":
        assert "DGGML_CUDA=on" in setup and "--gpu-layers -1" in card.text and "llama-cli -m" in card.text
    else:  # not llama.cpp's: no CUDA build flags, no --gpu-layers, no llama-cli
        assert "llama" not in setup and "--gpu-layers" not in card.text and "llama-cli" not in card.text
    if fmt == "onnx-genai":
        assert fields["execution_provider"] == "cpu" and "built for the CPU execution provider" in card.text
        assert setup.startswith("python3.11 -m venv")  # Jetson: PyPI's Arm64 wheels need CPython 3.11+
        assert fields["bench"]["command"] == "venv/bin/python bench.py --threads 6" and "og.Model(" in card.text
        assert "PyPI has no onnxruntime-genai-cuda for this device" in card.text
    if fmt == "onnx":
        assert fields["bench"]["command"] is None
        assert "bench.py runs GGUF and onnxruntime-genai models only" in card.text
    # The headline shows the parity figures, whatever the format.
    assert "parity with the torch student: perplexity ratio 1.0120 vs torch, top-1 agreement 97.5%" in card.text
    assert json.loads((out / "parity.json").read_text())["ppl_ratio"] == PARITY["ppl_ratio"]
    # What `edgeconv build` prints: the bundle's own lines, and its parity figures.
    (out / "manifest.json").write_text(json.dumps({**fields, "files": {}}))
    target = get_target("jetson")
    plan = SimpleNamespace(target=target, fmt=fmt, estimate=SimpleNamespace(params=1e6, total_bytes=1e6))
    printed = headline(SimpleNamespace(plan=plan, bundle=out, manifest={**fields, "files": {}}, parity=PARITY,
                                       results=None, seconds=1.0))
    assert f"(in the bundle; setup: {setup})" in printed and "perplexity ratio 1.0120 vs torch" in printed
    assert (fields["bench"]["command"] or "see its README.md") in printed
    assert ("--gpu-layers" in printed) == (fmt == "gguf")


def test_a_cuda_x86_target_builds_onnx_genai_for_cuda(students, tmp_path):
    text = get_target("laptop").model_dump_json(exclude={"source"})
    profile = {**json.loads(text), "name": "rtx-desktop", "accelerator": "cuda", "aliases": [],
               "description": "x86-64 desktop with an RTX 4090", "device": "x86-64 CPU + NVIDIA GPU"}
    toml = "\n".join(f"{k} = {json.dumps(v)}" for k, v in profile.items() if k != "bench")
    toml += "\n[bench]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in profile["bench"].items()) + "\n"
    (tmp_path / "rtx-desktop.toml").write_text(toml)
    target = load_profile(tmp_path / "rtx-desktop.toml")
    assert genai_provider(target) == "cuda" and genai_provider(get_target("jetson")) == "cpu"
    assert genai_provider(get_target("laptop")) == "cpu"
    run = launch(target, "onnx-genai")
    assert run.provider == "cuda" and run.setup == "python3 -m venv venv && venv/bin/pip install onnxruntime-genai-cuda"
    bundle_dir = tmp_path / "b"
    bundle_dir.mkdir()
    out, fields = bundle(bundle_dir, students["base"], "onnx-genai", target, provider="cuda")
    card = (out / "README.md").read_text()
    assert "venv/bin/pip install onnxruntime-genai-cuda" in card and fields["execution_provider"] == "cuda"
    assert "built for the CUDA execution provider" in card
