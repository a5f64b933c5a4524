"""lm-eval task YAMLs over edgeconv's evaluation data, so `lm_eval` scores the same held-out text, skills and
multiple-choice items on any local checkpoint:

    edgeconv eval --lm-eval-tasks tasks/
    lm_eval --model hf --model_args pretrained=DIR --include_path tasks/ --tasks edgeconv

One task per corpus (loglikelihood_rolling: word/byte perplexity, bits per byte), one per skill
(generate_until, exact match with leading spaces ignored) and one multiple-choice task (acc, acc_norm).
The data files are written next to the YAMLs, referenced by absolute path.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgeconv.evaluation.eval_data import EvalData

TEXT = """task: edgeconv_text_{corpus}
tag: [edgeconv]
dataset_path: json
dataset_kwargs:
  data_files:
    test: {file}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""

SKILL = """task: edgeconv_skill_{skill}
tag: [edgeconv]
dataset_path: json
dataset_kwargs:
  data_files:
    test: {file}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 32
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore: ["^\\\\s+", "\\\\s+$"]
metadata:
  version: 1.0
"""

CHOICE = """task: edgeconv_choice
tag: [edgeconv]
dataset_path: json
dataset_kwargs:
  data_files:
    test: {file}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path.absolute())


def write_lm_eval_tasks(out: Path, data: Path) -> list[str]:
    """Write the YAMLs and their data files into `out`; returns the task names."""
    ev = EvalData.load(data)
    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    names = []
    for corpus, docs in ev.texts.items():
        file = _jsonl(out / "data" / f"text_{corpus}.jsonl", [{"text": d} for d in docs])
        (out / f"edgeconv_text_{corpus}.yaml").write_text(TEXT.format(corpus=corpus, file=file))
        names.append(f"edgeconv_text_{corpus}")
    for skill, examples in ev.skills.items():
        file = _jsonl(out / "data" / f"skill_{skill}.jsonl", [{"prompt": p, "answer": a} for p, a in examples])
        (out / f"edgeconv_skill_{skill}.yaml").write_text(SKILL.format(skill=skill, file=file))
        names.append(f"edgeconv_skill_{skill}")
    file = _jsonl(out / "data" / "choice.jsonl", ev.choices)
    (out / "edgeconv_choice.yaml").write_text(CHOICE.format(file=file))
    names.append("edgeconv_choice")
    return names
