"""Ollama Modelfiles: FROM the GGUF, the model's chat template as Ollama's Go template, its stop tokens, num_ctx.

A tokenizer's chat template is Jinja (tokenizer_config.json's `chat_template`, or chat_template.jinja); Ollama's
TEMPLATE is a Go text/template over `.System` and `.Messages` (each with `.Role` and `.Content`). As Ollama's own
import does for common families, the template is recognized by its characteristic markers and replaced by the
equivalent Go template written for that family:

    chatml    <|im_start|>role ... <|im_end|>                       Qwen2, Qwen2-MoE, Qwen3, Qwen3-MoE, many others
    llama3    <|start_header_id|>role<|end_header_id|> ... <|eot_id|>    Llama 3.x
    harmony   <|start|>role<|channel|>...<|message|> ... <|end|>     GPT-OSS
    deepseek  <｜User｜> ... <｜Assistant｜>                          DeepSeek-V3 / R1
    deepseek2 User: ... Assistant: ... EOS                           DeepSeek-V2(-Lite)-Chat
    tulu      <|user|> ... <|assistant|>                             OLMoE-Instruct (Tulu)
    mistral   [INST] ... [/INST]                                     Mistral, Mixtral

A template of none of these (or none at all: a base model) gives no TEMPLATE and a comment that says why; the
prompt then goes to the model as it is. Stop tokens: the family's turn markers and the tokenizer's EOS token(s).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

INSTRUCTIONS = ("FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE")  # Ollama's Modelfile

# Go templates as Ollama writes them (its template/*.gotmpl): `.System` holds every system message, so the
# message loops skip the system role; the last message, when it is not the assistant's, opens the assistant turn.

CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}"""

LLAMA3 = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if or (eq .Role "user") (eq .Role "assistant") }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|eot_id|>{{ end }}
{{- end }}
{{- if and (ne .Role "assistant") $last }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}"""

HARMONY_SYSTEM = ("You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\n\n"
                  "Reasoning: medium\n\n# Valid channels: analysis, commentary, final. Channel must be included for "
                  "every message.")
HARMONY = """<|start|>system<|message|>{SYSTEM}<|end|>
{{- if .System }}<|start|>developer<|message|># Instructions

{{ .System }}

<|end|>
{{- end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|start|>user<|message|>{{ .Content }}<|end|>
{{- else if eq .Role "assistant" }}<|start|>assistant<|channel|>final<|message|>{{ .Content }}
{{- if not $last }}<|end|>{{ end }}
{{- end }}
{{- if and (ne .Role "assistant") $last }}<|start|>assistant{{ end }}
{{- end }}""".replace("{SYSTEM}", HARMONY_SYSTEM)

DEEPSEEK = """{{- if .System }}{{ .System }}{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<｜User｜>{{ .Content }}
{{- else if eq .Role "assistant" }}<｜Assistant｜>{{ .Content }}{{ if not $last }}<｜end▁of▁sentence｜>{{ end }}
{{- end }}
{{- if and (ne .Role "assistant") $last }}<｜Assistant｜>{{ end }}
{{- end }}"""

DEEPSEEK2 = """{{- if .System }}{{ .System }}

{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}User: {{ .Content }}

{{ else if eq .Role "assistant" }}Assistant: {{ .Content }}{{ if not $last }}{EOS}{{ end }}
{{- end }}
{{- if and (ne .Role "assistant") $last }}Assistant:{{ end }}
{{- end }}"""

TULU = """{{- if .System }}<|system|>
{{ .System }}
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|user|>
{{ .Content }}
{{ else if eq .Role "assistant" }}<|assistant|>
{{ .Content }}{{ if not $last }}{EOS}
{{ end }}
{{- end }}
{{- if and (ne .Role "assistant") $last }}<|assistant|>
{{ end }}
{{- end }}"""

MISTRAL = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}[INST] {{ if and $.System $last }}{{ $.System }}

{{ end }}{{ .Content }} [/INST]
{{- else if eq .Role "assistant" }}{{ .Content }}{{ if not $last }}{EOS}{{ end }}
{{- end }}
{{- end }}"""


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    markers: tuple[str, ...]  # all of them in the Jinja source
    template: str
    stops: tuple[str, ...]
    caveat: str = ""
    unless: tuple[str, ...] = ()  # markers of another family that shares these


# Most specific first: a harmony or Llama 3 template may mention other families' markers in its tool text.
FAMILIES = (
    Family("harmony", "GPT-OSS harmony", ("<|start|>", "<|message|>", "<|channel|>"), HARMONY,
           ("<|return|>", "<|call|>"),  # not <|end|>: it ends the analysis channel, before the final answer
           " The reply holds the analysis channel before the final one: Ollama's own gpt-oss models parse the two "
           "apart, a TEMPLATE cannot. No tools."),
    Family("llama3", "Llama 3", ("<|start_header_id|>", "<|eot_id|>"), LLAMA3,
           ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    Family("chatml", "ChatML", ("<|im_start|>", "<|im_end|>"), CHATML, ("<|im_start|>", "<|im_end|>")),
    Family("deepseek", "DeepSeek-V3", ("<｜User｜>", "<｜Assistant｜>"), DEEPSEEK,
           ("<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>")),
    Family("deepseek2", "DeepSeek-V2", ("User: ", "Assistant:"), DEEPSEEK2, ("User:", "Assistant:")),
    Family("tulu", "Tulu (OLMoE-Instruct)", ("<|user|>", "<|assistant|>"), TULU, ("<|user|>", "<|system|>")),
    Family("mistral", "Mistral [INST]", ("[INST]", "[/INST]"), MISTRAL, ("[INST]", "[/INST]"),
           unless=("<<SYS>>",)),  # Llama 2's [INST] puts the system prompt in <<SYS>>
)


@dataclass
class ChatFormat:
    """What a Modelfile says about chat: the Go template (None: none), the stop tokens, a default system prompt,
    and the comment that says where the template came from or why there is none."""

    family: str | None
    template: str | None
    stops: list[str] = field(default_factory=list)
    system: str | None = None
    note: str = ""


def tokenizer_chat(model_dir: str | Path) -> tuple[str | None, list[str]]:
    """The chat template (Jinja) of the tokenizer in `model_dir`, or None; and its EOS token(s): the tokenizer's
    eos_token and the tokens of generation_config.json's eos_token_id."""
    model_dir = Path(model_dir)
    config = _json(model_dir / "tokenizer_config.json")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    jinja = model_dir / "chat_template.jinja"
    if not template and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if not template:
        template = _json(model_dir / "chat_template.json").get("chat_template")
    eos = []
    token = config.get("eos_token")
    token = token.get("content") if isinstance(token, dict) else token
    if isinstance(token, str) and token:
        eos.append(token)
    ids = _json(model_dir / "generation_config.json").get("eos_token_id")
    ids = [ids] if isinstance(ids, int) else ids if isinstance(ids, list) else []
    if ids:
        eos += [t for t in _tokens_of(model_dir, [i for i in ids if isinstance(i, int)]) if t]
    return (template if isinstance(template, str) and template.strip() else None), list(dict.fromkeys(eos))


def _tokens_of(model_dir: Path, ids: list[int]) -> list[str]:
    by_id = {int(k): v.get("content") for k, v in (_json(model_dir / "tokenizer_config.json")
                                                  .get("added_tokens_decoder") or {}).items() if k.isdigit()}
    missing = [i for i in ids if i not in by_id]
    if missing:
        vocab = ((_json(model_dir / "tokenizer.json").get("model") or {}).get("vocab")) or {}
        if isinstance(vocab, dict):
            reverse = {v: k for k, v in vocab.items() if isinstance(v, int)}
            by_id.update({i: reverse[i] for i in missing if i in reverse})
    return [by_id.get(i) for i in ids]


def _json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def chat_format(jinja: str | None, eos: list[str]) -> ChatFormat:
    """The Go template for the Jinja chat template `jinja` (None: a base model), recognized by its markers."""
    eos_stops = [t for t in eos if t]
    if not jinja:
        return ChatFormat(None, None, eos_stops, note="No TEMPLATE: the tokenizer has no chat template (a base "
                          "model), so Ollama passes the prompt through as text.")
    family = next((f for f in FAMILIES if all(m in jinja for m in f.markers)
                   and not any(m in jinja for m in f.unless)), None)
    if family is None:
        return ChatFormat(None, None, eos_stops, note="No TEMPLATE: the tokenizer's chat template is not one edgeconv "
                          "translates to Ollama's Go template (" + ", ".join(f.label for f in FAMILIES) + "); "
                          "write one by hand (ollama.com/docs: Modelfile, TEMPLATE).")
    template = family.template
    if "{EOS}" in template:
        if not eos_stops:
            return ChatFormat(None, None, [], note=f"No TEMPLATE: the {family.label} chat template ends a turn with "
                              "the EOS token, and the tokenizer names none.")
        template = template.replace("{EOS}", eos_stops[0])
    return ChatFormat(family.name, template, list(dict.fromkeys([*family.stops, *eos_stops])),
                      system=_default_system(family.name, jinja),
                      note=f"TEMPLATE: the tokenizer's chat template ({family.label}) in Ollama's Go template syntax."
                      + family.caveat)


def _default_system(family: str, jinja: str) -> str | None:
    """The system prompt a ChatML template puts in when the conversation has none (Qwen2's "You are a helpful
    assistant."): Ollama's SYSTEM, so the model sees what it was trained with."""
    if family != "chatml":
        return None
    found = re.search(r"""['"]<\|im_start\|>system\\n((?:[^'"\\]|\\.)+?)<\|im_end\|>""", jinja)
    if not found:
        return None
    text = found.group(1).encode().decode("unicode_escape") if "\\" in found.group(1) else found.group(1)
    return text if text.strip() and '"""' not in text else None


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile(model_rel: str, model_dir: str | Path | None, *, context: int, threads: int | None = None,
              temperature: float = 0.7, name: str = "Modelfile") -> str:
    """The Modelfile `name` for the GGUF `model_rel` (relative to the Modelfile), with the chat template and stop
    tokens of the tokenizer in `model_dir` (None: a base model) and num_ctx `context`."""
    chat = chat_format(*tokenizer_chat(model_dir)) if model_dir is not None else chat_format(None, [])
    prompt = "'Hello!'" if chat.template else "'To be, or not to be'"
    lines = [f"# Ollama: ollama create my-model -f {name} && ollama run my-model {prompt}",
             *(f"# {line}" for line in _wrap(chat.note)),
             f"FROM ./{model_rel}"]
    if chat.template:
        lines.append(f'TEMPLATE """{chat.template}"""')
    if chat.system:
        lines.append(f'SYSTEM """{chat.system}"""')
    lines += [f"PARAMETER stop {_quote(stop)}" for stop in chat.stops]
    lines.append(f"PARAMETER num_ctx {context}")
    if threads:
        lines.append(f"PARAMETER num_thread {threads}")
    lines.append(f"PARAMETER temperature {temperature:g}")
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int = 110) -> list[str]:
    out, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*out, line] if line else out
