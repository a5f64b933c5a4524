"""The report's PNG plots, drawn with matplotlib's Agg canvas (no display, no global backend switch).

Each function returns (path, "") when it drew, or (None, why) when the results hold nothing to draw.
"""

from __future__ import annotations

from pathlib import Path

from edgeconv.reporting.results import BenchResult

ROLE_COLORS = {"teacher": "#d62728", "student": "#1f77b4"}
OTHER_COLOR = "#7f7f7f"
MARKERS = "osD^vP*X"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> tuple[Path, str]:
    fig.tight_layout()
    fig.savefig(path)
    return path, ""


def _color(r: BenchResult) -> str:
    return ROLE_COLORS.get(r.role, OTHER_COLOR)


def _role_legend(ax, rs: list[BenchResult], extra=()):
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", linestyle="", color=ROLE_COLORS.get(role, OTHER_COLOR), label=role)
               for role in sorted({r.role for r in rs})]
    ax.legend(handles=handles + list(extra), loc="best", fontsize=8, framealpha=0.85)


def _annotate(ax, x, y, text):
    """A point's label, to its right (to its left in the right half of the axes, so it stays inside)."""
    lo, hi = ax.get_xlim()
    left = x > lo + 0.5 * (hi - lo)
    return ax.annotate(text, (x, y), textcoords="offset points", xytext=(-6 if left else 6, 5), fontsize=8,
                       ha="right" if left else "left")


def _declutter(fig, labels: list) -> None:
    """Move point labels that overlap one drawn before them down (then up) until they are clear."""
    renderer = fig.canvas.get_renderer()
    placed = []
    for ann in labels:
        for step in range(12):
            box = ann.get_window_extent(renderer).expanded(1.02, 1.1)
            if not any(box.overlaps(other) for other in placed):
                break
            dy = -11 * ((step + 2) // 2) * (1 if step % 2 else -1)  # below, above, further below, ...
            ann.xyann = (ann.xyann[0], 5 + dy)
        placed.append(ann.get_window_extent(renderer))


def accuracy_vs_memory(rs: list[BenchResult], names: dict[int, str], path: Path) -> tuple[Path | None, str]:
    """One panel per accuracy metric (multiple choice, mean exact match) against peak RSS, points labelled."""
    series = [("choice_acc", "multiple choice acc (%)"), ("exact_match_mean", "exact match, mean over skills (%)")]
    panels = [(key, title, [r for r in rs if r.peak_rss_mb is not None and r.metric(key) is not None])
              for key, title in series]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None, "accuracy_vs_memory.png not drawn: no result has both peak RSS and accuracy"
    fig = _figure(6.2 * len(panels), 5)
    for i, (key, title, pts) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        xmax = max(r.peak_rss_mb for r in pts) * 1.35
        ymax = max(100 * r.metric(key) for r in pts)
        ax.set_xlim(0, xmax)
        ax.set_ylim(0, max(ymax * 1.2, 30 if key == "choice_acc" else 10))
        labels = []
        for r in pts:
            y = 100 * r.metric(key)
            ax.scatter(r.peak_rss_mb, y, s=60, color=_color(r), edgecolor="black", linewidth=0.5, zorder=3)
            labels.append(_annotate(ax, r.peak_rss_mb, y, names[id(r)]))
        if key == "choice_acc":
            ax.axhline(25, color="gray", linestyle=":", linewidth=1)
            ax.text(0.01 * xmax, 25, "chance, 4 choices (25 %)", va="bottom", fontsize=7, color="gray")
        ax.set_xlabel("peak RSS (MB), lower is better")
        ax.set_ylabel(f"{title}, higher is better")
        ax.set_title(f"{title.split(' (')[0].capitalize()} vs memory")
        ax.grid(alpha=0.3)
        _role_legend(ax, pts)
        fig.tight_layout()
        _declutter(fig, labels)
    return _save(fig, path)


def decode_vs_memory(rs: list[BenchResult], names: dict[int, str], path: Path) -> tuple[Path | None, str]:
    from matplotlib.lines import Line2D

    pts = [r for r in rs if r.peak_rss_mb is not None and r.decode is not None]
    if not pts:
        return None, "decode_vs_memory.png not drawn: no result has both peak RSS and decode tokens/s"
    targets = sorted({r.target or "no target" for r in pts})
    marker = {t: MARKERS[i % len(MARKERS)] for i, t in enumerate(targets)}
    fig = _figure(8, 5.2)
    ax = fig.add_subplot()
    ax.set_xlim(left=0, right=max(r.peak_rss_mb for r in pts) * 1.35)
    ax.set_ylim(bottom=0, top=max(r.decode for r in pts) * 1.2)
    labels = []
    for r in pts:
        ax.scatter(r.peak_rss_mb, r.decode, marker=marker[r.target or "no target"], s=60, color=_color(r),
                   edgecolor="black", linewidth=0.5, zorder=3)
        first = r.first_speed
        labels.append(_annotate(ax, r.peak_rss_mb, r.decode, f"{names[id(r)]} ({r.runtime.threads} thr"
                                + (f", prompt {first.prompt_tokens})" if first else ")")))
    ax.set_xlabel("peak RSS (MB), lower is better")
    ax.set_ylabel("decode (tokens/s), higher is better")
    ax.set_title("Decode speed vs memory (forward passes only, shortest prompt)")
    ax.grid(alpha=0.3)
    shapes = [Line2D([], [], marker=marker[t], linestyle="", color="white", markeredgecolor="black",
                     label=f"target {t}") for t in targets] if len(targets) > 1 else []
    _role_legend(ax, pts, shapes)
    fig.tight_layout()
    _declutter(fig, labels)
    return _save(fig, path)


def teacher_vs_student(pairs: list, path: Path) -> tuple[Path | None, str]:
    """Grouped bars per metric, normalised to the teacher (= 1): one panel per (teacher, student) pair.
    `pairs`: (teacher name, student name, comparison rows)."""
    pairs = [(t, s, [row for row in rows if row.ratio is not None]) for t, s, rows in pairs]
    pairs = [p for p in pairs if p[2]]
    if not pairs:
        return None, ("teacher_vs_student.png not drawn: no student has a teacher measured on the same device "
                      "(run `edgeconv bench --teacher`)")
    fig = _figure(max(9, 1.25 * max(len(rows) for _, _, rows in pairs) + 2), 4.8 * len(pairs))
    for i, (t, s, rows) in enumerate(pairs):
        ax = fig.add_subplot(len(pairs), 1, i + 1)
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [1.0] * len(rows), width=0.4, color=ROLE_COLORS["teacher"], alpha=0.75,
               label=f"teacher: {t}")
        ax.bar([x + 0.2 for x in xs], [row.ratio for row in rows], width=0.4, color=ROLE_COLORS["student"],
               alpha=0.9, label=f"student: {s}")
        for x, row in zip(xs, rows):
            ax.text(x + 0.2, row.ratio, f"{row.ratio:.2f}x", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([_tick(row) for row in rows], fontsize=7.5)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel("student / teacher")
        ax.set_ylim(0, max(row.ratio for row in rows) * 1.18 + 0.05)
        ax.set_title(f"Teacher vs student: {s} relative to {t} (teacher = 1)")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _tick(row) -> str:
    unit = f" {row.unit}" if row.unit and row.unit != "%" else row.unit
    digits = 2 if row.name.startswith("perplexity") or row.unit == "s" else 1
    value = f"{row.teacher:.{digits}f} -> {row.student:.{digits}f}{unit}"
    return f"{row.name}\n({row.better} is better)\n{value}"


def per_target(target: str, rs: list[BenchResult], names: dict[int, str], path: Path) -> tuple[Path | None, str]:
    """Three panels for one target: peak RSS, decode tokens/s, accuracy; one bar per result."""
    panels = [
        ("peak RSS (MB), lower is better", lambda r: r.peak_rss_mb),
        ("decode (tokens/s), higher is better", lambda r: r.decode),
        ("multiple choice acc (%), higher is better", lambda r: _pct(r.metric("choice_acc"))),
        ("exact match, mean (%), higher is better", lambda r: _pct(r.metric("exact_match_mean"))),
    ]
    panels = [(title, get) for title, get in panels if any(get(r) is not None for r in rs)]
    if not panels:
        return None, f"target_{target}.png not drawn: its results hold no memory, speed or accuracy"
    labels = [names[id(r)] for r in rs]
    fig = _figure(3.4 * len(panels) + 1, 0.45 * len(rs) + 2.4)
    for i, (title, get) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        values = [get(r) for r in rs]
        ys = range(len(rs))
        ax.barh(list(ys), [v or 0 for v in values], height=0.6, color=[_color(r) for r in rs], alpha=0.85)
        ax.set_ylim(len(rs) - 0.4, -0.6)  # top to bottom in the order given; a single bar stays a bar
        for y, v in zip(ys, values):
            ax.text(v or 0, y, f" {v:.1f}" if v is not None else " n/a", va="center", fontsize=8)
        ax.set_yticks(list(ys))
        ax.set_yticklabels(labels if i == 0 else [""] * len(rs), fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_xlim(0, (max([v for v in values if v is not None] or [0]) or 1) * 1.3)
        ax.grid(axis="x", alpha=0.3)
    devices = sorted({r.device_name for r in rs})
    fig.suptitle(f"Target {target}: {len(rs)} result{'s' * (len(rs) != 1)} on {', '.join(devices)}", fontsize=10)
    if len({r.role for r in rs}) > 1:
        _role_legend(fig.axes[-1], rs)
    return _save(fig, path)


def _pct(x: float | None) -> float | None:
    return None if x is None else 100 * x
