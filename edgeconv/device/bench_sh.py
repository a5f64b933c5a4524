"""What a GGUF bundle carries for llama.cpp's own programs: bench.sh (runs llama-bench and llama-perplexity on the
device, see its header) and the evaluation text as plain files, `eval/<corpus>.txt`, which llama-perplexity reads
(`-f`) where bench.py reads eval/text.jsonl. The bundle writer calls add_to_bundle(); the manifest then hashes
them like every other file, and bench.sh checks them before it runs anything."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from edgeconv.errors import EdgeconvError

BENCH_SH = Path(__file__).parent / "bench.sh"  # copied verbatim, as bench.py is
TEXT = "text.jsonl"


def corpus_texts(eval_dir: Path) -> dict[str, str]:
    """{corpus: its documents joined by a blank line} from EVAL_DIR/text.jsonl; {} when there is none."""
    path = Path(eval_dir) / TEXT
    if not path.is_file():
        return {}
    texts: dict[str, list[str]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            texts.setdefault(str(row["corpus"]), []).append(str(row["text"]))
        except (ValueError, KeyError, TypeError):
            raise EdgeconvError(f"{path}:{n} is not a JSON object with corpus and text",
                                "fix the evaluation data (edgeconv/assets/eval/text.jsonl shows the format)")
    return {corpus: "\n\n".join(docs) for corpus, docs in texts.items()}


def text_file_name(corpus: str) -> str:
    """A corpus name as a file name bench.sh globs (eval/*.txt) and names its results after."""
    return (re.sub(r"[^A-Za-z0-9._-]+", "-", corpus).strip("-.") or "text") + ".txt"


def add_to_bundle(bundle: Path) -> list[str]:
    """Write bench.sh and eval/<corpus>.txt into BUNDLE (its eval/ already copied); returns their relative paths."""
    bundle = Path(bundle)
    shutil.copyfile(BENCH_SH, bundle / "bench.sh")
    (bundle / "bench.sh").chmod(0o755)
    written = ["bench.sh"]
    for corpus, text in corpus_texts(bundle / "eval").items():
        rel = f"eval/{text_file_name(corpus)}"
        (bundle / rel).write_text(text, encoding="utf-8")
        written.append(rel)
    return written
