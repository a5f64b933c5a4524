"""Teacher / undistilled student / distilled student side by side, for the README.

    python benchmarks/demo/train.py distill-data
    edgeconv convert --out benchmarks/_work/distill-demo/student --distill-tokens 2097152 \\
        --distill-data benchmarks/_work/demo/distill-data.jsonl --distill-lr 1e-3
    python benchmarks/demo/distill_table.py benchmarks/_work/distill-demo/student

Reuses the card's cached reports (benchmarks/demo/card.py) for the teacher and the undistilled student and
writes benchmarks/results/demo_distill.{md,json}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import card  # noqa: E402

from edgeconv.demo import demo_path  # noqa: E402
from edgeconv.evaluation.suite import summary_table  # noqa: E402


def main() -> None:
    student = Path(sys.argv[1])
    work = Path("benchmarks/_work/card")
    undistilled = student.parent / f"{student.name}.work" / "assembled"
    reports = {
        "teacher": card.cached_eval("teacher (torch)", demo_path("demo-moe"), work / "reports"),
        "student, undistilled": card.cached_eval("undistilled " + str(undistilled), undistilled, work / "reports"),
        "student, distilled": card.cached_eval("distilled " + str(student), student, work / "reports"),
    }
    manifest = json.loads((student / "manifest.json").read_text())
    table = summary_table(list(reports.items()))
    (card.RESULTS / "demo_distill.md").write_text(table + "\n")
    (card.RESULTS / "demo_distill.json").write_text(json.dumps(
        {"reports": {k: v.model_dump() for k, v in reports.items()}, "distill_summary": manifest.get("summary")},
        indent=1))
    print(table)
    print(json.dumps(manifest.get("summary"), indent=1))


if __name__ == "__main__":
    main()
