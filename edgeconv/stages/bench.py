"""Bench here: the build's last stage runs the bundle's own bench.py (--quick) on this machine, in its own process
so its peak RSS is the runner's alone, after verifying the bundle like `edgeconv bench` does: the bundle's
bench.py runs only as the bytes its manifest hashed. Keyed by the bundle's key (a rebuilt bundle is measured
again); a failure is reported and the build still ends with its bundle (`optional`). The headline of what it
measured is then written into the bundle's model card (README.md; the bundle's manifest follows), so a bundle
published as it is says how its model ran."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgeconv.io.output_dir import read_manifest
from edgeconv.stages.stage import Identity, StageBase

RESULTS = "results.json"


class BenchStage(StageBase):
    name = "bench"
    optional = True

    def __init__(self, out: Path, *, bundle: Path, label: str, target: str, threads: int | None = None):
        self.out, self.bundle, self.run_label = Path(out), Path(bundle), label
        self.target, self.threads = target, threads

    def describe(self) -> str:
        return "bench.py --quick here, on this machine"

    def identity(self) -> Identity:
        if (self.out / "bundle-key").is_file() and read_manifest(self.out) is None:
            shutil.rmtree(self.out)  # an older edgeconv's bench directory (results.json + bundle-key): ours, redone
        return Identity({"bundle": (read_manifest(self.bundle) or {}).get("key")}, {})

    def run(self, tmp: Path) -> dict:
        from edgeconv.device.local_bench import resolve, run_runner

        r = run_runner(resolve(self.bundle), tmp / RESULTS, role="student", label=self.run_label,
                       threads=self.threads, quick=True, eval_data=None, extra=["--target", self.target])
        return {"decode_tok_s": r.get("decode_tok_s"), "load_s": r.get("load_s"), "peak_rss_mb": r.get("peak_rss_mb")}

    def done(self, result) -> None:
        """The bench headline goes into the bundle's card (README.md, and its entry in the bundle's manifest), also
        when this stage was up to date and the bundle was written again."""
        from edgeconv.stages.bundle import add_bench_headline

        results = bench_results(self.out)
        if results:
            add_bench_headline(self.bundle, results, "on the build machine")


def bench_results(out: Path) -> dict | None:
    """The results.json a bench stage wrote into `out`, if it did."""
    path = Path(out) / RESULTS
    return json.loads(path.read_text()) if path.is_file() else None
