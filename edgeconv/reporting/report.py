"""`edgeconv report`: markdown tables and PNG plots from bench.py's results.json files.

One row per result (label, role, target, device, memory, load time, speed, accuracy), speed per prompt length,
and for every student that has a teacher measured on the same device (and target) a side-by-side table with
student / teacher ratios. Plots: accuracy vs memory, decode tokens/s vs memory, teacher vs student (normalised
to the teacher) and one per target.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from edgeconv.errors import EdgeconvError
from edgeconv.reporting.results import BenchResult, load_results


@dataclass
class ReportResult:
    out: Path
    markdown: Path
    plots: list[Path] = field(default_factory=list)
    results: int = 0
    pairs: int = 0
    notes: list[str] = field(default_factory=list)  # plots not drawn, and why

    @property
    def paths(self) -> list[Path]:
        return [self.markdown, *self.plots]


@dataclass
class Row:
    """One metric of a teacher-vs-student comparison."""

    name: str
    unit: str
    better: str  # "lower" or "higher"
    teacher: float | None
    student: float | None

    @property
    def ratio(self) -> float | None:
        if self.teacher is None or self.student is None or self.teacher == 0:
            return None
        return self.student / self.teacher


def report(results: list[Path], out: Path) -> ReportResult:
    """Read the results files, write OUT/report.md and the plots; returns what was written."""
    rs = load_results([Path(p) for p in results])
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EdgeconvError(f"cannot create {out} ({exc.strerror})", "pass --out a directory you can write")
    names = display_names(rs)
    pairs = teacher_student_pairs(rs)
    res = ReportResult(out=out, markdown=out / "report.md", results=len(rs), pairs=len(pairs))

    from edgeconv.reporting import plots

    drawn = [
        plots.accuracy_vs_memory(rs, names, out / "accuracy_vs_memory.png"),
        plots.decode_vs_memory(rs, names, out / "decode_vs_memory.png"),
        plots.teacher_vs_student([(names[id(t)], names[id(s)], comparison(t, s)) for t, s in pairs],
                                 out / "teacher_vs_student.png"),
    ]
    for target, group in by_target(rs).items():
        drawn.append(plots.per_target(target, group, names, out / f"target_{slug(target)}.png"))
    for path, why in drawn:
        if path is not None:
            res.plots.append(path)
        else:
            res.notes.append(why)
    res.markdown.write_text(markdown(rs, names, pairs, res), encoding="utf-8")
    return res


# ---------------------------------------------------------------------------------------------------------
# grouping
# ---------------------------------------------------------------------------------------------------------

def display_names(rs: list[BenchResult]) -> dict[int, str]:
    """id(result) -> a label unique in this report: a repeated label gets the first of [target], [role],
    [target, role] that tells its results apart, and a counter if none does."""
    suffixes = [lambda r: r.target or "no target", lambda r: r.role,
                lambda r: f"{r.target or 'no target'}, {r.role}"]
    groups: dict[str, list[BenchResult]] = {}
    for r in rs:
        groups.setdefault(r.label, []).append(r)
    names: dict[int, str] = {}
    for label, group in groups.items():
        if len(group) == 1:
            names[id(group[0])] = label
            continue
        suffix = next((f for f in suffixes if len({f(r) for r in group}) == len(group)), suffixes[-1])
        seen: dict[str, int] = {}
        for r in group:
            name = f"{label} [{suffix(r)}]"
            seen[name] = seen.get(name, 0) + 1
            names[id(r)] = name if seen[name] == 1 else f"{name} #{seen[name]}"
    return names


def teacher_student_pairs(rs: list[BenchResult]) -> list[tuple[BenchResult, BenchResult]]:
    """(teacher, student) for each student with a teacher measured on the same device: the teacher of the same
    target if there is one, else one without a target, else the only teacher on that device."""
    pairs = []
    for s in (r for r in rs if r.role == "student"):
        teachers = [t for t in rs if t.role == "teacher" and t.device_key == s.device_key]
        t = (next((t for t in teachers if t.target == s.target), None)
             or next((t for t in teachers if t.target is None), None)
             or (teachers[0] if len(teachers) == 1 else None))
        if t is not None:
            pairs.append((t, s))
    return pairs


def by_target(rs: list[BenchResult]) -> dict[str, list[BenchResult]]:
    groups: dict[str, list[BenchResult]] = {}
    for r in rs:
        groups.setdefault(r.target or "no target", []).append(r)
    return groups


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "target"


def corpora(rs: list[BenchResult]) -> list[str]:
    seen: list[str] = []
    for r in rs:
        for c in (r.accuracy.perplexity if r.accuracy else {}):
            if c not in seen:
                seen.append(c)
    return seen


def speed_at(r: BenchResult, prompt_tokens: int | None):
    if prompt_tokens is None:
        return r.first_speed
    return next((s for s in r.speed if s.prompt_tokens == prompt_tokens), None)


def comparison(t: BenchResult, s: BenchResult) -> list[Row]:
    """The metrics of a teacher-vs-student table; speed at the shortest prompt length both measured."""
    common = sorted({x.prompt_tokens for x in t.speed} & {x.prompt_tokens for x in s.speed})
    p = common[0] if common else None
    ts, ss = speed_at(t, p), speed_at(s, p)
    at = f" @{p}" if p else ""

    def sp(x, key):
        return getattr(x, key) if x is not None else None

    rows = [
        Row("model size", "MB", "lower", t.model_mb, s.model_mb),
        Row("peak RSS", "MB", "lower", t.peak_rss_mb, s.peak_rss_mb),
        Row("load time", "s", "lower", t.load_s, s.load_s),
        Row(f"time to first token{at}", "ms", "lower", sp(ts, "ttft_ms"), sp(ss, "ttft_ms")),
        Row(f"prefill{at}", "tok/s", "higher", sp(ts, "prefill_tok_s"), sp(ss, "prefill_tok_s")),
        Row(f"decode{at}", "tok/s", "higher", sp(ts, "decode_tok_s"), sp(ss, "decode_tok_s")),
    ]
    for c in corpora([t, s]):
        rows.append(Row(f"perplexity {c}", "", "lower", t.metric(f"perplexity:{c}"), s.metric(f"perplexity:{c}")))
    rows.append(Row("exact match, mean", "%", "higher", pct(t.metric("exact_match_mean")),
                    pct(s.metric("exact_match_mean"))))
    rows.append(Row("multiple choice acc", "%", "higher", pct(t.metric("choice_acc")), pct(s.metric("choice_acc"))))
    return rows


def pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


# ---------------------------------------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------------------------------------

def fmt(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def results_table(rs: list[BenchResult], names: dict[int, str]) -> str:
    cs = corpora(rs)
    header = ["result", "role", "target", "device", "runtime", "model", "model MB", "peak RSS MB", "load s",
              "prompt", "TTFT ms", "prefill tok/s", "decode tok/s"]
    header += [f"ppl {c}" for c in cs] + ["exact match", "choice acc"]
    power = any(r.power for r in rs)  # Jetson figures depend on the power mode: shown whenever one was recorded
    if power:
        header.insert(4, "power")
    rows = []
    for r in rs:
        first = r.first_speed
        rt = r.runtime
        runtime = f"{rt.name or '?'}, {rt.threads} thr" + (f", {rt.gpu_layers} GPU layers" if rt.gpu_layers else "")
        model = " ".join(x for x in (Path(r.model.path).name, r.model.quant) if x)
        row = [names[id(r)], r.role, r.target or "-", r.device_name, runtime, model or "-", fmt(r.model_mb),
               fmt(r.peak_rss_mb), fmt(r.load_s, 2), str(first.prompt_tokens) if first else "-",
               fmt(first.ttft_ms if first else None), fmt(first.prefill_tok_s if first else None),
               fmt(r.decode)]
        row += [fmt(r.metric(f"perplexity:{c}"), 2) for c in cs]
        row += [_pct(r.metric("exact_match_mean")), _pct(r.metric("choice_acc"))]
        if power:
            row.insert(4, r.power or "-")
        rows.append(row)
    return table(header, rows)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def speed_table(rs: list[BenchResult], names: dict[int, str]) -> str:
    rows = [[names[id(r)], str(s.prompt_tokens), fmt(s.ttft_ms), fmt(s.prefill_tok_s), fmt(s.decode_tok_s)]
            for r in rs for s in sorted(r.speed, key=lambda s: s.prompt_tokens)]
    return table(["result", "prompt tokens", "TTFT ms", "prefill tok/s", "decode tok/s"], rows)


def llama_bench_table(rs: list[BenchResult], names: dict[int, str]) -> str:
    """llama-bench's tests as it names them (pp512, tg128), mean and standard deviation over its repetitions."""
    rows = [[names[id(r)], str(t.get("test")), fmt(t.get("avg_ts")), fmt(t.get("stddev_ts"))]
            for r in rs for t in r.llama_bench or []]
    return table(["result", "llama-bench test", "tok/s", "± stddev"], rows)


def comparison_table(rows: list[Row]) -> str:
    out = []
    for row in rows:
        unit = f" ({row.unit})" if row.unit else ""
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}x"
        digits = 2 if row.name.startswith("perplexity") or row.unit == "s" else 1
        out.append([f"{row.name}{unit}, {row.better} is better", fmt(row.teacher, digits), fmt(row.student, digits),
                    ratio])
    return table(["metric", "teacher", "student", "student / teacher"], out)


def markdown(rs: list[BenchResult], names: dict[int, str], pairs, res: ReportResult) -> str:
    sources = sorted({r.source for r in rs})
    parts = [
        "# edgeconv benchmark report",
        "",
        (f"{len(rs)} result{'s' * (len(rs) != 1)} from {', '.join(f'`{s}`' for s in sources)}. Speed columns are at "
        "the shortest prompt length each result measured (`prompt`); decode tokens/s counts the forward passes "
        "only, as llama.cpp's llama-bench does. Peak RSS covers loading and the speed runs (not the accuracy "
        "scoring, which keeps logits for every position)."),
        "",
        "## Results",
        "",
        results_table(rs, names),
        "",
        "## Speed by prompt length",
        "",
        speed_table(rs, names),
        "",
    ]
    if any(r.llama_bench for r in rs):
        parts += ["## llama-bench", "",
                  "Read from llama.cpp's `llama-bench -o json` (bench.sh, `edgeconv bench --adb`): prefill is its pp "
                  "test, decode its tg test, which decodes from an empty cache rather than after the prompt; it "
                  "measures neither memory nor load time.", "", llama_bench_table(rs, names), ""]
    parts += [
        "## Teacher vs student",
        "",
    ]
    if not pairs:
        parts += ["No student has a teacher measured on the same device (run `edgeconv bench --teacher`).", ""]
    for t, s in pairs:
        where = s.device_name + (f", target {s.target}" if s.target else "")
        parts += [f"### {names[id(s)]} vs {names[id(t)]} ({where})", "", comparison_table(comparison(t, s)), ""]
    parts += ["## Plots", ""]
    for p in res.plots:
        parts += [f"![{p.stem.replace('_', ' ')}]({p.name})", ""]
    for note in res.notes:
        parts += [f"- {note}"]
    notes = [(names[id(r)], n) for r in rs for n in r.notes]
    if notes:
        parts += ["", "## Notes from the runs", ""] + [f"- {name}: {n}" for name, n in notes]
    return "\n".join(parts).rstrip() + "\n"
