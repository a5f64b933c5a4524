"""A bundle checked against its manifest in edgeconv's own process, before any of the bundle's code runs.

`edgeconv bench BUNDLE` calls verify_bundle() first: every file that manifest.json lists must be inside the
bundle (no absolute path, no `..`, no symbolic link leading out), present, of its size and of its sha256;
bench.py must be one of them, and the manifest's `model` a safe relative path naming listed files. Only then
does the runner start, and what starts is the bench.py bytes hashed here (see benchmark.run_runner).

What this protects against: a bundle damaged or partly replaced in transit (a truncated copy, a modified
bench.py or model). Not against someone who can rewrite manifest.json as well, since the hashes live there:
for that, `--expect-sha256` compares manifest.json itself with the hash `edgeconv build` printed.

bench.py carries its own copy of these checks (it runs on devices without edgeconv); bundle_problems() returns
the same problems, word for word, as bench.py's verify_bundle() (tests/test_trust_bench.py holds them to it).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePath

from edgeconv.errors import EdgeconvError
from edgeconv.io.output_dir import MANIFEST, sha256_file

RUNNER = "bench.py"


@dataclass
class VerifiedBundle:
    path: Path
    manifest: dict  # parsed from the very bytes that were hashed
    manifest_sha256: str  # sha256 of manifest.json: what `edgeconv build` prints, what --expect-sha256 takes
    runner: bytes  # bench.py's bytes as they matched the manifest: what runs, not the file as it may be later


def manifest_sha256(bundle: Path) -> str:
    return sha256_file(Path(bundle) / MANIFEST)


def unsafe_path(rel: str) -> bool:
    """An absolute path, one with `..`, or one that names nothing (".")."""
    parts = PurePath(rel).parts
    return PurePath(rel).is_absolute() or ".." in parts or not parts or rel.startswith(("/", "\\"))


def _inside(root: Path, rel: str) -> bool:
    """Whether ROOT/REL, symbolic links followed, stays inside ROOT (ROOT already resolved)."""
    try:
        (root / rel).resolve().relative_to(root)
    except ValueError:
        return False
    return True


def _model_problems(manifest: dict) -> list[str]:
    model = manifest.get("model")
    if model is None or model == "":
        return []  # bench.py then looks for the one model in the bundle; what it reads is checked there
    if not isinstance(model, str) or unsafe_path(model):
        return [f"model {model} in manifest.json is not a path inside the bundle"]
    want = PurePath(model).parts
    files = manifest.get("files") or {}
    if not any(PurePath(rel).parts[:len(want)] == want for rel in files):  # a file, or a directory of files
        return [f"model {model} in manifest.json is not among its hashed files"]
    return []


def bundle_problems(bundle: Path, manifest_bytes: bytes | None = None) -> list[str]:
    """Problems found checking BUNDLE against manifest.json (MANIFEST_BYTES if given: the bytes already read);
    [] if none. The same problems, in the same words and order, as bench.py's verify_bundle()."""
    bundle = Path(bundle)
    if manifest_bytes is None:
        if not (bundle / MANIFEST).is_file():
            return [f"{bundle} has no manifest.json"]
        manifest_bytes = (bundle / MANIFEST).read_bytes()
    try:
        manifest = json.loads(manifest_bytes.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError is one
        return [f"manifest.json is not valid JSON ({exc})"]
    if not isinstance(manifest, dict):
        return ["manifest.json does not hold a JSON object"]
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return ["manifest.json lists no files"]
    root = bundle.resolve()
    problems = []
    for rel, want in sorted(files.items()):
        if unsafe_path(rel):  # a manifest must not point outside its bundle
            problems.append(f"{rel} in manifest.json is not a path inside the bundle")
            continue
        if not _inside(root, rel):
            problems.append(f"{rel} leads outside the bundle (a symbolic link)")
            continue
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
            continue
        size = path.stat().st_size
        if isinstance(want, dict) and "bytes" in want and size != want["bytes"]:
            problems.append(f"{rel} does not match manifest.json (size {size} bytes, expected {want['bytes']}: the "
                            "file was truncated, damaged or replaced)")
            continue
        if not isinstance(want, dict) or sha256_file(path) != want.get("sha256"):
            problems.append(f"{rel} does not match manifest.json (sha256 differs: the file was modified or damaged)")
    if RUNNER not in files:
        problems.append(f"{RUNNER} is not listed in manifest.json")
    return problems + _model_problems(manifest)


def verify_bundle(bundle: Path, expect_sha256: str | None = None) -> VerifiedBundle:
    """Check BUNDLE against its manifest (and the manifest against EXPECT_SHA256); raises EdgeconvError before
    anything of the bundle runs. Returns the manifest and the runner's bytes as they were hashed."""
    bundle = Path(bundle)
    if expect_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", expect_sha256.strip()):
        raise EdgeconvError(f"--expect-sha256 {expect_sha256!r} is not a sha256",
                            "pass the 64 hex digits `edgeconv build` printed for the bundle's manifest")
    try:
        manifest_bytes = (bundle / MANIFEST).read_bytes()
    except OSError as exc:
        raise EdgeconvError(f"cannot read {bundle / MANIFEST} ({exc.strerror or exc})", "re-copy the bundle")
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    if expect_sha256 is not None and digest != expect_sha256.strip().lower():
        raise EdgeconvError(
            f"{bundle / MANIFEST} differs from the one printed at build time (sha256 {digest}, expected "
            f"{expect_sha256.strip().lower()}): the manifest itself was changed, so its hashes vouch for nothing; "
            "nothing was run", "copy the bundle again from the machine that built it")
    problems = bundle_problems(bundle, manifest_bytes)
    if problems:
        more = f" (and {len(problems) - 1} more problem{'s' * (len(problems) > 2)})" if len(problems) > 1 else ""
        raise EdgeconvError(f"{bundle} does not match its manifest: {problems[0]}{more}; nothing was run",
                            "re-copy the bundle")
    manifest = json.loads(manifest_bytes.decode("utf-8"))
    # bench.py read once more, now for keeps: these bytes are what runs, so a swap after the check above is caught.
    runner = (bundle.resolve() / RUNNER).read_bytes()
    if hashlib.sha256(runner).hexdigest() != manifest["files"][RUNNER].get("sha256"):
        raise EdgeconvError(f"{bundle / RUNNER} changed while it was being checked; nothing was run",
                            "re-copy the bundle, and let nothing write to it while it is benchmarked")
    return VerifiedBundle(bundle, manifest, digest, runner)
