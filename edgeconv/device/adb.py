"""`edgeconv bench BUNDLE --adb [SERIAL] --llama-bench PATH`: llama.cpp's llama-bench on an Android phone, driven
from this computer over adb, the way llama.cpp's docs/android.md runs its programs (push them to /data/local/tmp,
run them from `adb shell` with LD_LIBRARY_PATH pointing at their shared libraries).

In order: the bundle is verified here (edgeconv.device.verify); the phone is asked what it is (getprop: model,
SoC, Android release, ABI; cores, memory); an x86-64 llama-bench is refused for an Arm phone before anything is
pushed; the model and eval/<corpus>.txt go to /data/local/tmp/edgeconv/ unless the phone already holds them with
their manifest sha256 (checked with the phone's sha256sum, again after pushing), llama-bench (and llama-perplexity
when it sits next to it) to bin/, their lib*.so to lib/; then

    adb shell "cd /data/local/tmp/edgeconv && LD_LIBRARY_PATH=/data/local/tmp/edgeconv/lib \\
               ./bin/llama-bench -m MODEL -p 512 -n 128 -t THREADS -o json > llama-bench.json"

and llama-perplexity -c 512 per corpus; the outputs are pulled into OUT/android-SERIAL/ with
llama-bench.edgeconv.json (bundle, target, phone) beside them, as bench.sh writes them, and a report is made.
Nothing is removed from the phone: the model is reused next time (`adb shell rm -r /data/local/tmp/edgeconv`).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from edgeconv.device.verify import verify_bundle
from edgeconv.errors import EdgeconvError
from edgeconv.reporting.llama_bench import parse_perplexity, records, test_name

REMOTE = "/data/local/tmp/edgeconv"
RC = "edgeconv-rc="  # `adb shell` of old adb versions does not pass the exit status back: echoed after each command
ELF_MACHINES = {3: "x86", 40: "arm", 62: "x86_64", 183: "aarch64"}
ABI_MACHINES = {"arm64-v8a": "aarch64", "armeabi-v7a": "arm", "x86_64": "x86_64", "x86": "x86"}
PERPLEXITY_CONTEXT = 512


@dataclass
class Programs:
    """An Android build of llama.cpp's programs: llama-bench, llama-perplexity if beside it, their shared libs."""

    llama_bench: Path
    llama_perplexity: Path | None = None
    libs: list[Path] = field(default_factory=list)


def find_programs(path: Path) -> Programs:
    """PATH is the llama-bench program, or a directory holding it: a build's bin/ (build-android/bin, where
    llama.cpp also puts its shared libraries), the llama.cpp checkout above it, or an install prefix (`cmake --install
    build-android --prefix DIR`: DIR/bin, DIR/lib). A static build has no lib*.so; a shared one needs them, from
    beside the program or in ../lib."""
    path = Path(path)
    if path.is_dir():
        found = next((d / "llama-bench" for d in (path, path / "bin", path / "build-android" / "bin")
                      if (d / "llama-bench").is_file()), None)
        if found is None:
            raise EdgeconvError(f"{path} holds no llama-bench (looked in it, bin/ and build-android/bin/)",
                                "pass --llama-bench the Android build's llama-bench or its install directory")
        path = found
    elif not path.is_file():
        raise EdgeconvError(f"--llama-bench {path} does not exist", "pass the Android build's llama-bench")
    libs: dict[str, Path] = {}
    for d in (path.parent, path.parent.parent / "lib"):
        for lib in sorted(d.glob("lib*.so*")) if d.is_dir() else []:
            if lib.is_file():
                libs.setdefault(lib.name, lib)
    ppl = path.parent / "llama-perplexity"
    return Programs(path, ppl if ppl.is_file() else None, list(libs.values()))


def elf_machine(path: Path) -> str | None:
    """The CPU an ELF program is built for (aarch64, x86_64, ...); None for anything else (a script)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    order = "little" if head[5] == 1 else "big"
    machine = int.from_bytes(head[18:20], order)
    return ELF_MACHINES.get(machine, f"machine {machine}")


class Adb:
    """The adb program, for one device (-s SERIAL when given)."""

    def __init__(self, serial: str | None = None, exe: str = "adb"):
        found = shutil.which(exe)
        if found is None:
            raise EdgeconvError(f"{exe} was not found on PATH",
                                "install Android's platform-tools (adb) and enable USB debugging on the phone")
        self.exe, self.serial = found, serial or None

    def run(self, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
        cmd = [self.exe, *(["-s", self.serial] if self.serial else []), *args]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise EdgeconvError(f"adb {' '.join(args[:2])} did not finish in {timeout:.0f} s", "check the phone")
        if proc.returncode != 0:
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            raise EdgeconvError(f"adb {' '.join(args[:2])} failed: {last[0]}",
                                "check `adb devices` (one phone, USB debugging allowed), or pass --adb SERIAL")
        return proc

    def shell(self, command: str, timeout: float = 3600) -> tuple[int, str]:
        """Run COMMAND in the phone's shell: (its exit status, its output)."""
        out = self.run("shell", f"{command}; echo {RC}$?", timeout=timeout).stdout
        lines = out.rstrip("\n").split("\n")
        rc = int(lines[-1][len(RC):]) if lines and lines[-1].startswith(RC) else 255
        return rc, "\n".join(lines[:-1])

    def push(self, local: Path, remote: str) -> None:
        self.run("push", str(local), remote)

    def pull(self, remote: str, local: Path) -> None:
        self.run("pull", remote, str(local))


def phone_facts(adb: Adb) -> dict:
    """What the phone is, from getprop and /proc: one `adb shell`, every value on a line of its own."""
    probes = {"model": "getprop ro.product.model", "manufacturer": "getprop ro.product.manufacturer",
              "soc": "getprop ro.soc.model", "hardware": "getprop ro.hardware",
              "release": "getprop ro.build.version.release", "abi": "getprop ro.product.cpu.abi",
              "machine": "uname -m", "cores": "nproc",
              "memory_kb": "awk '/^MemTotal:/ { print $2 }' /proc/meminfo"}
    script = "; ".join(f"echo {key}=$({cmd} 2>/dev/null)" for key, cmd in probes.items())
    _, out = adb.shell(script, timeout=60)
    facts = {key: "" for key in probes}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key in facts:
            facts[key] = value.strip()
    return facts


def remote_hashes(adb: Adb, rels: list[str]) -> dict[str, str]:
    """{relative path: sha256} of the files under REMOTE the phone holds (its sha256sum); missing ones left out."""
    _, out = adb.shell(f"cd {REMOTE} && sha256sum {' '.join(shlex.quote(r) for r in rels)} 2>/dev/null", timeout=600)
    hashes = {}
    for line in out.splitlines():
        digest, _, rel = line.strip().partition("  ")
        if len(digest) == 64 and rel:
            hashes[rel.lstrip("*")] = digest.lower()
    return hashes


def bench_android(bundle: Path, llama_bench: Path, out_dir: Path, *, serial: str | None = None,
                  threads: int | None = None, quick: bool = False, perplexity: bool = True,
                  expect_sha256: str | None = None, adb: str = "adb", report: bool = True) -> dict:
    """Run llama-bench (and llama-perplexity) from BUNDLE on an Android phone over adb; returns what was written:
    {"dir", "llama_bench", "sidecar", "perplexity", "report", "facts", "pushed", "skipped", "summary"}."""
    started, clock = datetime.now(UTC), time.time()
    checked = verify_bundle(Path(bundle), expect_sha256)
    manifest, files = checked.manifest, checked.manifest["files"]
    if manifest.get("format", "gguf") != "gguf":
        raise EdgeconvError(f"{bundle} holds an {manifest.get('format')} model; llama-bench runs GGUF files",
                            "pass a GGUF bundle (edgeconv build --target android)")
    model = str(manifest["model"])
    texts = sorted(rel for rel in files if rel.startswith("eval/") and rel.endswith(".txt"))
    programs = find_programs(llama_bench)
    phone = Adb(serial, adb)
    state = phone.run("get-state", timeout=60).stdout.strip()
    if state != "device":
        raise EdgeconvError(f"the phone is {state or 'not ready'}", "unlock it and allow USB debugging")
    serial_no = phone.run("get-serialno", timeout=60).stdout.strip() or serial or "device"
    facts = phone_facts(phone)
    want = ABI_MACHINES.get(facts["abi"]) or facts["machine"] or None
    for prog in [programs.llama_bench, programs.llama_perplexity]:
        got = elf_machine(prog) if prog else None
        if got and want and got != want:
            raise EdgeconvError(f"{prog} is built for {got}; the phone ({facts['abi'] or facts['machine']}) needs "
                                f"{want}", "build llama.cpp with the Android NDK (sh bench.sh in the bundle prints "
                                "how) and pass its llama-bench")

    # Push what the phone does not hold yet, then check every bundle file there against the manifest.
    phone.shell(f"mkdir -p {REMOTE}/bin {REMOTE}/lib {REMOTE}/eval", timeout=60)
    held = remote_hashes(phone, [model, *texts])
    pushed, skipped = [], []
    for rel in [model, *texts]:
        if held.get(rel) == files[rel]["sha256"]:
            skipped.append(rel)
            continue
        phone.push(checked.path / rel, f"{REMOTE}/{rel}")
        pushed.append(rel)
    if pushed:
        held = remote_hashes(phone, [model, *texts])
        bad = [rel for rel in pushed if held.get(rel) not in (None, files[rel]["sha256"])]
        if bad:
            raise EdgeconvError(f"{bad[0]} on the phone does not match manifest.json after the push",
                                "run again (the transfer was damaged), or free space on the phone")
    on_phone = all(held.get(rel) == files[rel]["sha256"] for rel in [model, *texts])
    for prog in filter(None, [programs.llama_bench, programs.llama_perplexity]):
        phone.push(prog, f"{REMOTE}/bin/{prog.name}")
        pushed.append(f"bin/{prog.name}")
    for lib in programs.libs:
        phone.push(lib, f"{REMOTE}/lib/{lib.name}")
        pushed.append(f"lib/{lib.name}")
    phone.shell(f"chmod 755 {REMOTE}/bin/*", timeout=60)

    cores = int(facts["cores"]) if facts["cores"].isdigit() else None
    wanted = threads or int(manifest.get("threads") or cores or 4)
    use = min(wanted, cores) if cores and not threads else wanted
    env = f"LD_LIBRARY_PATH={REMOTE}/lib " if programs.libs else ""
    args = ["-m", model, "-p", "512", "-n", "128", "-t", str(use), "-o", "json"] + (["-r", "2"] if quick else [])
    bench_cmd = f"{env}./bin/llama-bench {shlex.join(args)}"
    rc, _ = phone.shell(f"cd {REMOTE} && {bench_cmd} > llama-bench.json 2> llama-bench.log")
    if rc != 0:
        _, log = phone.shell(f"tail -n 3 {REMOTE}/llama-bench.log", timeout=60)
        last = log.strip().splitlines()[-1:] or [f"exit status {rc}"]
        raise EdgeconvError(f"llama-bench failed on the phone: {last[0]}",
                            f"run it by hand: adb shell 'cd {REMOTE} && {bench_cmd}'")

    where = Path(out_dir) / f"android-{_slug(serial_no)}"
    where.mkdir(parents=True, exist_ok=True)
    phone.pull(f"{REMOTE}/llama-bench.json", where / "llama-bench.json")
    phone.pull(f"{REMOTE}/llama-bench.log", where / "llama-bench.log")

    notes, ppl, ppl_cmd, chunks = [], {}, None, 4 if quick else 32
    if not on_phone:
        notes.append("the phone has no sha256sum: the copies there were not checked against manifest.json")
    ppl_file = None
    if perplexity and programs.llama_perplexity is None:
        notes.append(f"no llama-perplexity next to {programs.llama_bench}: perplexity not measured")
    elif perplexity and texts:
        sections = []
        for rel in texts:
            corpus = Path(rel).stem
            args = ["-m", model, "-f", rel, "-c", str(PERPLEXITY_CONTEXT), "--chunks", str(chunks), "-t", str(use)]
            cmd = f"{env}./bin/llama-perplexity {shlex.join(args)}"
            ppl_cmd = cmd.replace(f" -f {rel} ", " -f eval/CORPUS.txt ")
            rc, _ = phone.shell(f"cd {REMOTE} && {cmd} > perplexity-{corpus}.txt 2>&1")
            phone.pull(f"{REMOTE}/perplexity-{corpus}.txt", where / f".perplexity-{corpus}.txt")
            text = (where / f".perplexity-{corpus}.txt").read_text(encoding="utf-8", errors="replace")
            (where / f".perplexity-{corpus}.txt").unlink()
            sections.append(f"# edgeconv corpus {corpus}: {cmd}\n{text}")
            ppl[corpus] = parse_perplexity(text)
            if rc != 0:
                notes.append(f"llama-perplexity failed on {rel} (see perplexity.txt)")
        ppl_file = where / "perplexity.txt"
        ppl_file.write_text("".join(sections), encoding="utf-8")

    memory = int(facts["memory_kb"]) / 1024 if facts["memory_kb"].isdigit() else None
    sidecar = {
        "schema": "edgeconv-llama-bench/1",
        "llama_bench": "llama-bench.json",
        "label": manifest.get("name") or Path(bundle).name,
        "role": "student",
        "target": manifest.get("target"),
        "bundle": str(bundle),
        "verified": on_phone,
        "model": {"path": model, "format": "gguf", "bytes": files[model].get("bytes"), "quant": manifest.get("quant")},
        "threads": use,
        "threads_capped_from": wanted if use != wanted else None,
        "gpu_layers": None,
        "commands": {"llama_bench": f"adb shell 'cd {REMOTE} && {bench_cmd}'", "llama_perplexity": ppl_cmd},
        "perplexity": ppl,
        "perplexity_settings": {"context": PERPLEXITY_CONTEXT, "chunks": chunks,
                                "output": ppl_file.name if ppl_file else None},
        "device": {
            "platform": f"Android {facts['release']}".strip(), "system": "Android", "machine": facts["machine"] or None,
            "processor": facts["soc"] or facts["hardware"] or None, "abi": facts["abi"] or None,
            "logical_cores": cores, "memory_total_mb": round(memory, 1) if memory else None, "board_model": None,
            "jetson_model": None, "android_model": " ".join(x for x in (facts["manufacturer"], facts["model"]) if x)
            or None, "gpu": [], "hostname": serial_no, "nvpmodel": None, "jetson_clocks": None,
        },
        "pushed": pushed,
        "notes": notes,
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(time.time() - clock, 1),
    }
    (where / "llama-bench.edgeconv.json").write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    made = None
    if report:
        from edgeconv.reporting import report as make_report

        made = make_report([where / "llama-bench.json"], where / "report").markdown
    summary = [f"{facts['manufacturer']} {facts['model']} ({facts['soc'] or facts['abi']}), {use} threads".strip()]
    recs = records((where / "llama-bench.json").read_text(encoding="utf-8")) or []
    summary += [f"{test_name(r)}: {r['avg_ts']:,.1f} ± {r.get('stddev_ts') or 0:,.1f} tok/s" for r in recs]
    summary += [f"perplexity {c} (llama-perplexity -c {PERPLEXITY_CONTEXT}): {v}" for c, v in ppl.items()]
    return {"dir": where, "llama_bench": where / "llama-bench.json", "sidecar": where / "llama-bench.edgeconv.json",
            "perplexity": ppl_file, "report": made, "facts": facts, "pushed": pushed, "skipped": skipped,
            "summary": summary + notes}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in text) or "device"
