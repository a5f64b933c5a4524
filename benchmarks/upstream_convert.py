"""Run llama.cpp's convert_hf_to_gguf.py (the vendored one) with one change: an unknown BPE pre-tokenizer is named.

    python benchmarks/upstream_convert.py --tokenizer-pre qwen2 -- MODEL_DIR --outtype f16 --outfile OUT.gguf

convert_hf_to_gguf.py names the pre-tokenizer by hashing the tokenization of a test string against a list of
released tokenizers, and stops on any other (NotImplementedError). The real-shape checkpoints carry the shipped
4,096-token demo tokenizer, which is on no such list; its split regex is Qwen2's, so it is named as edgeconv's
exporter names it (`qwen2`, from tokenizer.json). Only the `tokenizer.ggml.pre` string depends on this: every
tensor is converted by the unmodified script. A recognised tokenizer keeps the script's own answer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp_tools  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer-pre", default="qwen2", help="llama.cpp pre-tokenizer name for an unknown BPE")
    ap.add_argument("--source", type=Path, default=None, help="llama.cpp source tree [default: the vendored one]")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="-- then convert_hf_to_gguf.py's arguments")
    ns = ap.parse_args()
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    src = ns.source or llama_cpp_tools.source()
    llama_cpp_tools.converter_deps()  # sentencepiece, into benchmarks/_work/llama-cpp-pydeps if missing
    sys.path.insert(0, str(src))  # `conversion` package; the script adds its gguf-py itself
    sys.argv = [str(src / "convert_hf_to_gguf.py"), *args]
    import convert_hf_to_gguf  # noqa: E402  (inserts src/gguf-py before `import gguf`)
    from conversion import base  # noqa: E402

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            base.logger.warning(f"pre-tokenizer not in llama.cpp's list: named {ns.tokenizer_pre!r} "
                                "(upstream_convert.py)")
            return ns.tokenizer_pre

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
