"""Tokenizer metadata for GGUF: a byte-level BPE vocabulary from tokenizer.json.

llama.cpp does not run the Hugging Face pre-tokenizer; it recognises it by name (`tokenizer.ggml.pre`)
and applies its own copy of that regex. We read the pre-tokenizer from tokenizer.json and name it
explicitly (llama.cpp's converter guesses by hashing the tokenization of a test string, which a locally
trained vocabulary never matches); the export's parity check then compares llama.cpp's tokenization
with the HF tokenizer's on real text.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from edgeconv.errors import EdgeconvError

# Split regexes of pre-tokenizers llama.cpp implements, as tokenizer.json spells them.
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
KNOWN_SPLITS = {QWEN2_REGEX: "qwen2", LLAMA3_REGEX: "llama-bpe"}


def detect_pre_tokenizer(tokenizer_json: dict) -> str:
    """The llama.cpp name of a byte-level BPE's pre-tokenizer, or an error saying what was found."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # GPT-2's regex, which tokenizers' ByteLevel applies
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        splits = [p for p in parts if p.get("type") == "Split"]
        byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
        if len(splits) == 1 and byte_level and not byte_level[0].get("use_regex", True):
            regex = splits[0].get("pattern", {}).get("Regex")
            if regex in KNOWN_SPLITS:
                return KNOWN_SPLITS[regex]
    raise EdgeconvError(
        f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:120]}) is not one edgeconv can name for llama.cpp",
        "pass --tokenizer-pre NAME (a llama.cpp pre-tokenizer name such as gpt-2, qwen2, llama-bpe)",
    )


def add_vocab(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int, pre: str | None = None) -> str:
    """Write tokens, types, merges and special ids; returns the pre-tokenizer name used."""
    from transformers import AutoTokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise EdgeconvError(f"{model_dir} has no tokenizer.json", "GGUF export needs a fast (tokenizer.json) tokenizer")
    data = json.loads(path.read_text())
    if data.get("model", {}).get("type") != "BPE":
        raise EdgeconvError(
            f"the tokenizer in {model_dir} is a {data.get('model', {}).get('type')} model",
            "GGUF export supports byte-level BPE tokenizers (GPT-2, Qwen, Llama-3 style)",
        )
    pre = pre or detect_pre_tokenizer(data)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)
    return pre
