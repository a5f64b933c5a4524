"""Atomic stage outputs: build in a hidden temp directory next to the target, rename when complete.

An interrupted run (Ctrl-C, SIGKILL, a full disk) leaves at most a hidden ``.NAME.edgeconv-tmp-PID``
directory, never a directory that looks finished; stale ones are removed by the next run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgeconv import __version__
from edgeconv.errors import EdgeconvError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TMP_TAG = ".edgeconv-tmp-"


def read_manifest(directory: Path) -> dict | None:
    try:
        data = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and "edgeconv_version" in data else None


def check_can_write(out: Path, force: bool, key: str | None = None) -> None:
    """Refuse to replace something that is not ours, or another run's output unless forced.

    `--force` only ever replaces a directory edgeconv wrote (its manifest says so) or an empty one: a file or
    a directory of someone else's is never deleted. A damaged output of this same run (same stage key) is
    rebuilt without asking: nothing is lost.
    """
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise EdgeconvError(f"output path {out} exists and is a file", "choose another --out, or remove it yourself")
    if not any(out.iterdir()):
        return
    manifest = read_manifest(out)
    if manifest is None:
        raise EdgeconvError(
            f"output directory {out} holds files edgeconv did not write",
            "choose another --out (--force replaces only edgeconv outputs and empty directories)",
        )
    if force or (key is not None and manifest.get("key") == key):
        return
    raise EdgeconvError(
        f"output directory {out} holds another edgeconv {manifest.get('stage', '')} output "
        "(different inputs or options)",
        "choose another --out, or pass --force to replace it",
    )


def check_out_early(out: Path, force: bool, stages: tuple[str, ...]) -> None:
    """Before any work: refuse an --out that the final write would refuse whatever the run computes.

    An edgeconv output of one of `stages` may be this same run's (its key is known only at the end), so
    it passes here and the stage decides; anything else is decided now.
    """
    out = Path(out)
    manifest = read_manifest(out) if out.is_dir() else None
    if manifest is not None and manifest.get("stage") in stages:
        return
    check_can_write(out, force)


def as_record(record: dict) -> dict:
    """A run record as it reads back from JSON (paths and dataclasses as strings, tuples as lists)."""
    return json.loads(json.dumps(record, default=str))


def read_work_record(work: Path, command: str) -> dict | None:
    """The options of the `command` run that last claimed `work`, if any."""
    try:
        record = json.loads((Path(work) / f"{command}.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def claim_work(work: Path, command: str, record: dict, force: bool) -> None:
    """Make `work` this run's, refusing one that holds a run of `command` with other options unless forced.

    Stage keys catch a changed option only when that stage writes, which can be after hours of work; the
    record `COMMAND.json` catches it before any. Call after every check, right before the first heavy step.
    """
    record = as_record(record)
    theirs = read_work_record(work, command)
    holds_work = any(p.name != f"{command}.json" for p in Path(work).iterdir()) if Path(work).is_dir() else False
    if theirs is not None and theirs != record and not force and holds_work:
        diffs = sorted(k for k in set(record) | set(theirs) if record.get(k) != theirs.get(k))
        raise EdgeconvError(
            f"{work} holds a `{command}` run with other inputs or options "
            f"({', '.join(f'{k}: {theirs.get(k)} -> {record.get(k)}' for k in diffs)})",
            "choose another --out, or pass --force to replace that run's results",
        )
    Path(work).mkdir(parents=True, exist_ok=True)
    path = Path(work) / f"{command}.json"
    tmp = path.with_name(f".{path.name}{TMP_TAG}{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def drop_claim_if_idle(work: Path, command: str) -> None:
    """After a failed run: remove the record, and `work` itself, when the run left nothing else there."""
    work = Path(work)
    if work.is_dir() and all(p.name == f"{command}.json" for p in work.iterdir()):
        (work / f"{command}.json").unlink(missing_ok=True)
        work.rmdir()


def temp_path(out: Path) -> Path:
    """The hidden temp directory this process builds `out` in: `.NAME.edgeconv-tmp-PID` beside it."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}{TMP_TAG}{os.getpid()}"


def remove_stale_temps(out: Path) -> None:
    """Remove temp directories (or files) of `out` left by runs that were killed: their PID is not alive."""
    out = Path(out).absolute()
    if not out.parent.is_dir():
        return
    for stale in out.parent.glob(f".{out.name}{TMP_TAG}*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _pid_alive(int(pid)) and int(pid) != os.getpid():
            continue  # another live run is writing there
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def disk_full_error(out: Path) -> EdgeconvError:
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path(".")).free
    return EdgeconvError(
        f"the disk filled up while writing {out} ({free / 1e9:.1f} GB free now); nothing was kept",
        "free some space or choose an --out on a larger disk, then run the same command again",
    )


@contextmanager
def atomic_output_dir(out: Path, force: bool = False, key: str | None = None) -> Iterator[Path]:
    """Yield a temp directory; on success it replaces `out`, on any failure it is deleted."""
    out = Path(out).absolute()
    check_can_write(out, force, key)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    tmp = temp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise disk_full_error(out) from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Named like a temp directory, so a run killed between the two renames leaves nothing a sweep misses.
    old = out.parent / f".{out.name}{TMP_TAG}old-{os.getpid()}"
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def stage_key(stage: str, inputs: dict, options: dict) -> str:
    """The hash that names a stage's work: same stage, inputs and options means the same output."""
    blob = json.dumps({"stage": stage, "inputs": inputs, "options": options}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def new_manifest(stage: str, key: str, inputs: dict, options: dict, files: dict, summary: dict) -> dict:
    return {
        "edgeconv_version": __version__,
        "stage": stage,
        "key": key,
        "inputs": inputs,
        "options": options,
        "summary": summary,
        "files": {name: files[name] for name in sorted(files)},
    }


def write_manifest(directory: Path, stage: str, key: str, inputs: dict, options: dict, files: dict,
                   summary: dict) -> dict:
    manifest = new_manifest(stage, key, inputs, options, files, summary)
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def finished_output(out: Path, stage: str, key: str) -> dict | None:
    """The manifest of `out` if it is this exact stage's finished output and its files are intact.

    Intact means every file the manifest lists is there with its size and, where recorded, its sha256:
    hashing is far cheaper than recomputing, and a file damaged in place keeps its size. A damaged
    output is reported in one line and rebuilt. Temp directories of killed runs of `out` are removed.
    """
    out = Path(out)
    remove_stale_temps(out)
    manifest = read_manifest(out)
    if not manifest or manifest.get("stage") != stage or manifest.get("key") != key:
        return None
    for name, entry in manifest.get("files", {}).items():
        path = out / name
        if not path.is_file() or path.stat().st_size != entry.get("bytes"):
            logger.warning("%s: %s is missing or has another size than its manifest says; rebuilding %s",
                           out, name, stage)
            return None
        if entry.get("sha256") and sha256_file(path) != entry["sha256"]:
            logger.warning("%s: %s differs from its manifest (sha256); rebuilding %s", out, name, stage)
            return None
    return manifest
