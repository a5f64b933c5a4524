"""Per-step metrics as JSONL (one object per optimizer step) and the loss curve as a PNG."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Appends one line per step. On resume, lines past the checkpoint's step (written by the killed run after
    its last checkpoint) are dropped first, so the log reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        kept = [row for row in read(self.path) if row["step"] <= resume_step]
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(row) + "\n")


def read(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            break
    return rows


def plot(rows: list[dict], png: Path, title: str) -> None:
    """Loss (and its KL and CE parts) against tokens trained, and the learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [r["tokens"] / 1e6 for r in rows]
    fig, (ax, lr_ax) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=[3, 1])
    ax.plot(tokens, [r["loss"] for r in rows], label="loss (trained)", color="black", lw=1.5)
    ax.plot(tokens, [r["kl"] for r in rows], label="KL(teacher || student) x T^2", lw=1, alpha=0.8)
    ax.plot(tokens, [r["ce"] for r in rows], label="cross-entropy on the data", lw=1, alpha=0.8)
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    lr_ax.plot(tokens, [r["lr"] for r in rows], color="gray")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("tokens trained (millions)")
    lr_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
