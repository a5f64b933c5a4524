"""What every command that writes `--out` does first: never write into or over an input, one run per output.

- `check_not_an_input`: `--out` (and its `OUT.work/`) must not be, contain, or lie inside any input: a
  `--force` there would delete the teacher, or a later run would read its own output as data.
- `output_lock`: an exclusive `flock` on `.NAME.edgeconv-lock` beside OUT for the whole command, so two runs
  into the same OUT cannot interleave (the second waits with a message, or refuses under `--no-wait`).
- `guarded`: a decorator that does both around a library function, and removes the directories the call
  created if it fails while they are still empty (a refused run leaves nothing behind).
"""

from __future__ import annotations

import contextvars
import fcntl
import functools
import inspect
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from edgeconv.errors import EdgeconvError

logger = logging.getLogger(__name__)

LOCK_TAG = ".edgeconv-lock"

# Whether a run waits for another one holding its output's lock (the CLI's --no-wait sets False).
WAIT_FOR_LOCK: contextvars.ContextVar[bool] = contextvars.ContextVar("edgeconv_wait_for_lock", default=True)

_held: dict[Path, int] = {}  # lock path -> nesting depth in this process (convert inside build, distill inside convert)


def work_dir(out: Path) -> Path:
    """OUT.work/ beside OUT: where multi-stage commands keep their intermediate stages."""
    out = Path(out).absolute()
    return out.parent / f"{out.name}.work"


def _local_path(value, existing_only: bool = True) -> Path | None:
    """An input as a path on this disk, if it is one (a demo name resolves to its shipped directory)."""
    if not isinstance(value, (str, os.PathLike)):
        return None  # None, or an object already loaded (a Plan)
    path = Path(value).expanduser()
    if path.exists() or not existing_only:
        return path.resolve()
    from edgeconv.demo import DEMO_MODELS, demo_path

    if str(value) in DEMO_MODELS:
        return demo_path(str(value)).resolve()
    return None  # a hub id, or a path that does not exist (its own check reports it)


def check_not_an_input(out: str | Path, inputs: Mapping[str, object], *, work: Path | None = None,
                       existing_only: bool = True) -> None:
    """Refuse an --out (or its work directory) that is, contains or lies inside one of `inputs`.

    Inputs that do not exist are skipped (their own checks report them) unless `existing_only` is False,
    for a path this run will create and read back (a teacher cache)."""
    outs = [("--out", Path(out).absolute())]
    if work is not None:
        outs.append((f"its work directory {work.name}", Path(work).absolute()))
    for role, value in inputs.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            src = _local_path(item, existing_only)
            if src is None:
                continue
            for what, target in outs:
                t = target.resolve()
                if t == src:
                    relation = "is"
                elif src.is_relative_to(t):
                    relation = "contains"
                elif t.is_relative_to(src):
                    relation = "is inside"
                else:
                    continue
                subject = f"--out {out}" if what == "--out" else f"--out {out} ({what})"
                raise EdgeconvError(
                    f"{subject} {relation} the {role} {item}",
                    "choose an --out outside every input: edgeconv never writes into or over what it reads",
                )


def _lock_owner(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return "another edgeconv run"
    return f"another edgeconv run (pid {pid})" if pid.isdigit() else "another edgeconv run"


@contextmanager
def output_lock(out: str | Path, *, wait: bool | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `out` for the duration; reentrant within a process.

    Under torchrun / accelerate only the main process (RANK 0) locks: the others are the same run.
    The lock file is removed on release; a waiter that got the lock on a file removed meanwhile retries.
    """
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    out = Path(out).absolute()
    lock = out.parent / f".{out.name}{LOCK_TAG}"
    if lock in _held:
        _held[lock] += 1
        try:
            yield
        finally:
            _held[lock] -= 1
        return
    wait = WAIT_FOR_LOCK.get() if wait is None else wait
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise EdgeconvError(f"cannot write to {lock.parent} ({exc.strerror or exc})", "choose a writable --out")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _lock_owner(lock)
            if not wait:
                os.close(fd)
                raise EdgeconvError(f"{owner} is writing {out}",
                                    "wait for it to finish and run again, or drop --no-wait to wait for it")
            logger.warning("waiting for %s writing %s to finish ...", owner, out)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file after we opened it: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _held[lock] = 1
    try:
        yield
    finally:
        del _held[lock]
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass
        os.close(fd)


def _missing_ancestors(path: Path) -> list[Path]:
    """`path` and its parents that do not exist yet, deepest first."""
    missing = []
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing.append(p)
    return missing


def _remove_if_empty(paths: list[Path]) -> None:
    for p in paths:  # deepest first, so a parent emptied by its child's removal goes too
        try:
            if p.is_dir() and not p.is_symlink():
                for sub in sorted(p.rglob("*"), key=lambda q: len(q.parts), reverse=True):
                    if sub.is_dir() and not sub.is_symlink():
                        sub.rmdir()  # raises if anything but empty directories is there
                p.rmdir()
        except OSError:
            continue


@contextmanager
def guard_output(out: str | Path, inputs: Mapping[str, object], *, work: Path | None = None) -> Iterator[None]:
    """Check `out` against the inputs, hold its lock, and on failure remove what was created and is empty."""
    out = Path(out).absolute()
    check_not_an_input(out, inputs, work=work)
    created = _missing_ancestors(out) + (_missing_ancestors(Path(work).absolute()) if work else [])
    try:
        with output_lock(out):
            yield
    except BaseException:
        _remove_if_empty(sorted(set(created), key=lambda p: len(p.parts), reverse=True))
        raise


def guarded(out_arg: str, *input_args: str, work: bool | str = False) -> Callable:
    """Decorate a library function that writes `out_arg` and reads `input_args` (argument names): the call
    runs inside `guard_output`. Its work directory counts as output too: OUT.work/ with `work=True`, the
    subdirectory OUT.work/NAME with `work="NAME"` (distill, whose student may sit in OUT.work/assembled)."""

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            out = Path(bound.arguments[out_arg]).absolute()
            inputs = {name.replace("_", " "): bound.arguments.get(name) for name in input_args}
            where = None if not work else work_dir(out) if work is True else work_dir(out) / work
            with guard_output(out, inputs, work=where):
                return fn(*args, **kwargs)

        return wrapper

    return decorate
