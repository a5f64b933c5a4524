"""The evaluation data: held-out documents per corpus (perplexity), skill prompts with exact answers, and
multiple-choice items built from the held-out text (which line comes next?).

On disk it is a directory of three JSONL files, the same files the lm-eval task YAMLs read:
  text.jsonl    {"corpus", "name", "text"}
  skills.jsonl  {"skill", "prompt", "answer"}
  choice.jsonl  {"corpus", "context", "choices": [4 lines], "label": index of the true next line}
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from edgeconv.errors import EdgeconvError
from edgeconv.evaluation import skills as skill_mixture

FILES = ("text.jsonl", "skills.jsonl", "choice.jsonl")


@dataclass
class EvalData:
    path: Path
    texts: dict[str, list[str]] = field(default_factory=dict)  # corpus -> documents
    skills: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # skill -> (prompt, answer)
    choices: list[dict] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> EvalData:
        path = Path(path)
        missing = [f for f in FILES if not (path / f).exists()]
        if missing:
            raise EdgeconvError(f"evaluation data {path} lacks {', '.join(missing)}",
                                "pass --data a directory written by edgeconv (text, skills and choice JSONL files)")
        data = cls(path)
        for row in _rows(path / "text.jsonl"):
            data.texts.setdefault(row["corpus"], []).append(row["text"])
        for row in _rows(path / "skills.jsonl"):
            data.skills.setdefault(row["skill"], []).append((row["prompt"], row["answer"]))
        data.choices = list(_rows(path / "choice.jsonl"))
        return data


def held_out_mix(data: EvalData, chars_per_corpus: int = 80_000) -> list[str]:
    """Documents covering every kind of held-out data: the first `chars_per_corpus` characters of each corpus,
    and all skill examples as one document (for routing histograms and similar statistics)."""
    docs = ["\n".join(d)[:chars_per_corpus] for d in data.texts.values()]
    docs.append("".join(f"{p} {a}\n" for exs in data.skills.values() for p, a in exs))
    return docs


def _rows(file: Path):
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                raise EdgeconvError(f"{file}:{n} is not valid JSON", "fix or regenerate the evaluation data")


def choice_items(docs: list[str], corpus: str, n: int, rng: random.Random) -> list[dict]:
    """`n` items: the lines before a line as context, that line and 3 lines of similar length from elsewhere
    in the corpus as choices (shuffled)."""
    lines = [[ln for ln in d.splitlines()] for d in docs]
    candidates = [(di, li) for di, doc in enumerate(lines) for li, ln in enumerate(doc)
                  if li >= 4 and 25 <= len(ln.strip()) <= 90]
    pool = [ln for doc in lines for ln in doc if 25 <= len(ln.strip()) <= 90]
    items = []
    for di, li in rng.sample(candidates, min(n, len(candidates))):
        true = lines[di][li]
        context = "\n".join(lines[di][max(0, li - 6):li])[-400:] + "\n"
        similar = [ln for ln in rng.sample(pool, min(200, len(pool))) if ln != true and 0.6 < len(ln) / len(true) < 1.6]
        if len(similar) < 3:
            continue
        choices = [true] + similar[:3]
        rng.shuffle(choices)
        items.append({"corpus": corpus, "context": context, "choices": choices, "label": choices.index(true)})
    return items


def write_eval_data(out: Path, texts: dict[str, list[tuple[str, str]]], *, seed: int = 3, skill_examples: int = 100,
                    chars_per_corpus: int = 300_000, choice_per_corpus: int = 200) -> dict:
    """Write the three files from held-out documents {corpus: [(name, text)]}; skills from `seed`."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    counts: dict = {}
    with open(out / "text.jsonl", "w") as fh:
        for corpus, docs in texts.items():
            used = 0
            for name, text in docs:
                if used >= chars_per_corpus:
                    break
                text = text[: chars_per_corpus - used]
                fh.write(json.dumps({"corpus": corpus, "name": name, "text": text}) + "\n")
                used += len(text)
            counts[f"text/{corpus}"] = used
    examples = skill_mixture.examples(seed, skill_examples * len(skill_mixture.SKILLS.names()))
    with open(out / "skills.jsonl", "w") as fh:
        fh.writelines(json.dumps({"skill": e.skill, "prompt": e.prompt, "answer": e.answer}) + "\n" for e in examples)
    counts["skills"] = len(examples)
    with open(out / "choice.jsonl", "w") as fh:
        for corpus, docs in texts.items():
            items = choice_items([t for _, t in docs], corpus, choice_per_corpus, rng)
            fh.writelines(json.dumps(item) + "\n" for item in items)
            counts[f"choice/{corpus}"] = len(items)
    return counts
