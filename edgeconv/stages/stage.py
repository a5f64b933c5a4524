"""The stage contract and its runner.

A stage writes one directory, atomically, with a manifest.json that records a key: the hash of the stage's name,
its inputs (fingerprints, sha256s) and its options. A rerun whose key matches a finished, intact output skips
the stage. Every command that writes is a list of stages run by `run_stages`: `--dry-run` prints that list
(`describe_stages`), progress lines are numbered from it, and the skip / refuse / write logic below is the only
copy there is.

A stage (the `Stage` protocol) has:

    name        its name in its manifest and in its key ("calibrate", "assemble", "distill", "build-export", ...)
    out         the directory it writes
    describe()  one line: what it does (--dry-run)
    identity()  Identity(inputs, options): key = stage_key(name, inputs, options). Called when the stage is
                reached, so it may read what the stages before it wrote (the plan, the student's manifest); it
                also does the checks that need the inputs opened, so a bad input fails before any heavy work
    run(tmp)    the work, written into `tmp` (renamed to `out` when complete); returns the manifest's summary

and, with defaults in `StageBase`, the parts only some stages need: `prepare()` for heavy work that needs no
output directory (calibration, training: the temp directory then exists only while the output is written, as
before), `done(result)` and `failed()` to tidy up, and the flags described there.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from edgeconv.errors import EdgeconvError
from edgeconv.io.guard import output_lock
from edgeconv.io.output_dir import (
    MANIFEST,
    atomic_output_dir,
    check_can_write,
    claim_work,
    drop_claim_if_idle,
    finished_output,
    new_manifest,
    sha256_file,
    stage_key,
)

logger = logging.getLogger(__name__)

UP_TO_DATE = "      up to date"


@dataclass
class Identity:
    """What names a stage's work. `inputs` and `options` make the key; `recorded` is the manifest's "inputs":
    the keyed inputs plus where they were read (a path is recorded, not keyed: a moved checkpoint is the same
    input). None records `inputs` as they are."""

    inputs: dict
    options: dict
    recorded: dict | None = None


class Stage(Protocol):
    """What every stage implements (and the runner relies on); StageBase gives the optional rest."""

    name: str
    out: Path

    def describe(self) -> str: ...

    def identity(self) -> Identity: ...

    def run(self, tmp: Path) -> dict: ...


class StageBase:
    """The optional parts of the contract, with what most stages want."""

    label: str | None = None  # what progress lines and --dry-run call it [default: name]
    keyed: bool = True  # False: no key, no manifest, never skipped: runs every time, writing `out` itself (the
    #                     plan, milliseconds; the study's prescreen and finals, which resume from their own rows)
    optional: bool = False  # a failure (EdgeconvError) is reported and the stages after it still run
    force_redoes: bool = False  # --force rebuilds it even when up to date (the build's own stages)
    replaces: bool = False  # may replace another edgeconv output at `out` without --force (it is this run's own)
    writer: bool = True  # this process writes `out`; under torchrun only the main one does (set in prepare())
    key: str | None = None  # set by the runner once identity() is known
    force: bool = False  # set by the runner: the command's --force
    known_files: dict | None = None  # {name: {"sha256", "bytes"}} computed while writing (assemble's shards)
    extra: dict | None = None  # handed to StageResult.extra (distill: its teacher cache's manifest)

    def prepare(self) -> None:
        """The heavy work that needs no output directory; runs after the up-to-date check, before `run`."""

    def manifest(self, key: str, identity: Identity, files: dict, summary: dict) -> dict:
        recorded = identity.inputs if identity.recorded is None else identity.recorded
        return new_manifest(self.name, key, recorded, identity.options, files, summary)

    def done(self, result: StageResult) -> None:
        """After the output is in place, or was found up to date."""

    def failed(self) -> None:
        """After anything in the stage raised (the exception then propagates)."""


@dataclass
class StageResult:
    name: str
    out: Path
    skipped: bool  # `out` was already this stage's finished output
    manifest: dict  # its manifest ({} for a stage that keeps none, or a process that did not write)
    extra: dict = field(default_factory=dict)  # what the stage handed on beside its output

    def stats(self):
        """calibrate: the statistics it wrote."""
        from edgeconv.calibration.stats import CalibrationStats

        return CalibrationStats.load(self.out)

    @property
    def cache(self) -> dict | None:
        """distill: the teacher cache's manifest (offline mode), else None."""
        return self.extra.get("cache")

    @property
    def plan(self) -> dict:
        """upcycle: its upcycle_plan.json (which layers were fused, and why)."""
        from edgeconv.stages.upcycle import PLAN

        return json.loads((self.out / PLAN).read_text())


def label(stage: Stage) -> str:
    return stage.label or stage.name


def hash_files(root: Path, known: dict | None = None) -> dict:
    """{relative path: {"sha256", "bytes"}} of every file under `root`; `known` entries are taken as they are."""
    known = known or {}
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            name = str(path.relative_to(root))
            files[name] = known.get(name) or {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return files


def run_stage(stage: Stage, *, force: bool = False, progress_lines: bool = False) -> StageResult:
    """Skip the stage if `out` is its finished, intact output (same key); else refuse an `out` it may not
    replace before any heavy work, do the work and publish `out` atomically with its manifest.
    `progress_lines`: say "up to date" when skipping (run_stages; a single-stage command says it itself)."""
    if not stage.keyed:
        return StageResult(stage.name, Path(stage.out), False, {}, dict(stage.run(Path(stage.out)) or {}))
    out = Path(stage.out)
    stage.force = force
    with output_lock(out):
        try:
            identity = stage.identity()
            key = stage_key(stage.name, identity.inputs, identity.options)
            stage.key = key
            done = None if force and stage.force_redoes else finished_output(out, stage.name, key)
            if done:
                result = StageResult(stage.name, out, True, done, dict(stage.extra or {}))
                if progress_lines:
                    logger.info(UP_TO_DATE)
            else:
                replace = force or stage.replaces
                check_can_write(out, replace, key)  # before the heavy work, not at its end
                stage.prepare()
                manifest: dict = {}
                if stage.writer:
                    with atomic_output_dir(out, replace, key) as tmp:
                        summary = stage.run(tmp)
                        manifest = stage.manifest(key, identity, hash_files(tmp, stage.known_files), summary)
                        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
                result = StageResult(stage.name, out, False, manifest, dict(stage.extra or {}))
            stage.done(result)
        except BaseException:
            stage.failed()
            raise
    return result


def run_stages(stages: Sequence[Stage], *, force: bool = False) -> list[StageResult]:
    """Run `stages` in order, each line of progress numbered from the list."""
    results = []
    for i, stage in enumerate(stages, 1):
        logger.info(f"[{i}/{len(stages)}] {label(stage)} -> {stage.out}")
        try:
            result = run_stage(stage, force=force, progress_lines=True)
        except EdgeconvError as exc:
            if not stage.optional:
                raise
            logger.warning(f"      {label(stage)} failed: {exc.line()}")
            result = StageResult(stage.name, Path(stage.out), False, {}, {"error": exc.line()})
        results.append(result)
    return results


def run_pipeline(stages: Sequence[Stage], *, work: Path, command: str, record: dict,
                 force: bool = False) -> list[StageResult]:
    """A multi-stage command: claim its work directory (refusing one that holds a run with other options, before
    any work), run the stages; a run that fails before its first stage wrote anything leaves no work directory."""
    claim_work(work, command, record, force)
    try:
        return run_stages(stages, force=force)
    except BaseException:
        drop_claim_if_idle(work, command)
        raise


def describe_stages(stages: Sequence[Stage], indent: str = "    ") -> list[str]:
    """What --dry-run prints: exactly the list `run_stages` runs, numbered the same."""
    width = max((len(label(s)) for s in stages), default=0)
    return [f"{indent}{i}. {label(s):<{width}}  {s.describe()} -> {s.out}" for i, s in enumerate(stages, 1)]
