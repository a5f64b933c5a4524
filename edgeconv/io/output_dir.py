"""Atomic stage outputs: build in a hidden temp directory next to the target, rename when complete.

An interrupted run (Ctrl-C, SIGKILL, a full disk) leaves at most a hidden ``.NAME.edgeconv-tmp-PID``
directory, never a directory that looks finished; stale ones are removed by the next run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from edgeconv import __version__
from edgeconv.errors import EdgeconvError

MANIFEST = "manifest.json"
TMP_TAG = ".edgeconv-tmp-"


def read_manifest(directory: Path) -> dict | None:
    try:
        data = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and "edgeconv_version" in data else None


def check_can_write(out: Path, force: bool, key: str | None = None) -> None:
    """Refuse to replace something that is not ours, or another run's output, unless forced.

    A damaged output of this same run (same stage key) is rebuilt without asking: nothing is lost.
    """
    if not out.exists() or force:
        return
    if not out.is_dir():
        raise EdgeconvError(f"output path {out} exists and is a file", "choose another --out or pass --force to replace it")
    if not any(out.iterdir()):
        return
    manifest = read_manifest(out)
    if manifest is None:
        raise EdgeconvError(
            f"output directory {out} exists and is not an edgeconv output",
            "choose another --out, or pass --force to replace it",
        )
    if key is not None and manifest.get("key") == key:
        return
    raise EdgeconvError(
        f"output directory {out} holds another edgeconv {manifest.get('stage', '')} output (different inputs or options)",
        "choose another --out, or pass --force to replace it",
    )


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
    old = out.parent / f".{out.name}.edgeconv-old-{os.getpid()}"
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


def write_manifest(directory: Path, stage: str, key: str, inputs: dict, options: dict, files: dict, summary: dict) -> dict:
    manifest = {
        "edgeconv_version": __version__,
        "stage": stage,
        "key": key,
        "inputs": inputs,
        "options": options,
        "summary": summary,
        "files": {name: files[name] for name in sorted(files)},
    }
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def finished_output(out: Path, stage: str, key: str) -> dict | None:
    """The manifest of `out` if it is this exact stage's finished output and its files are intact."""
    manifest = read_manifest(out)
    if not manifest or manifest.get("stage") != stage or manifest.get("key") != key:
        return None
    for name, entry in manifest.get("files", {}).items():
        path = Path(out) / name
        if not path.is_file() or path.stat().st_size != entry.get("bytes"):
            return None
    return manifest
