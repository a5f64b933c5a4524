"""Issue 20, point 4: `edgeconv bench BUNDLE --adb [SERIAL] --llama-bench PATH` pushes the model, the eval text and an
Android llama-bench to /data/local/tmp/edgeconv/, runs it with `adb shell` (LD_LIBRARY_PATH for a shared build),
pulls the JSON and reports. There is no phone here: a stand-in `adb` on PATH records every call, keeps the pushed
files in a folder that plays the phone's /data/local/tmp, and runs `adb shell` commands there with sh (getprop and
nproc are stand-ins too, saying "Google Pixel 8, arm64-v8a, 8 cores"); the pushed llama-bench is a stand-in that
records its arguments and prints canned JSON."""

import json
import os
import shutil

import pytest
from click.testing import CliRunner
from device_bundle import CANNED, CANNED_PPL, calls, make_bundle, script, stand_in_llama_cpp, tiny_gguf

from edgeconv.cli import main
from edgeconv.device.adb import REMOTE, elf_machine, find_programs

ADB = r'''#!/usr/bin/env python3
"""Stand-in adb: records argv, plays the phone in $STANDIN_PHONE (its /data/local/tmp), runs shell commands there."""
import json, os, shutil, subprocess, sys

args = sys.argv[1:]
with open(os.environ["STANDIN_ADB_LOG"], "a") as fh:
    fh.write(json.dumps(args) + "\n")
phone = os.environ["STANDIN_PHONE"]
if os.environ.get("STANDIN_NO_DEVICE"):
    sys.exit("error: no devices/emulators found")
serial = "STANDIN01"
if args[:1] == ["-s"]:
    serial, args = args[1], args[2:]
local = lambda remote: phone + remote  # /data/local/tmp/... on the phone -> a path here
if args == ["get-state"]:
    print("device")
elif args == ["get-serialno"]:
    print(serial)
elif args[0] == "push":
    os.makedirs(os.path.dirname(local(args[2])), exist_ok=True)
    shutil.copyfile(args[1], local(args[2]))
    if os.environ.get("STANDIN_DAMAGE") and args[2].endswith(".gguf"):
        with open(local(args[2]), "r+b") as fh:
            fh.write(b"damaged")
    print(f"{args[1]}: 1 file pushed, 0 skipped.")
elif args[0] == "pull":
    if not os.path.exists(local(args[1])):
        sys.exit(f"adb: error: failed to stat remote object '{args[1]}': No such file or directory")
    shutil.copyfile(local(args[1]), args[2])
    print(f"{args[1]}: 1 file pulled, 0 skipped.")
elif args[0] == "shell":
    command = " ".join(args[1:]).replace("/data/local/tmp", phone + "/data/local/tmp")
    env = {**os.environ, "PATH": os.environ["STANDIN_PHONE_BIN"] + ":" + os.environ["PATH"]}
    proc = subprocess.run(["sh", "-c", command], env=env)
    sys.exit(proc.returncode)
else:
    sys.exit(f"stand-in adb: unknown command {args}")
'''


@pytest.fixture(scope="module")
def bundle(small_eval, tmp_path_factory):
    root = tmp_path_factory.mktemp("adb")
    dense, gguf = tiny_gguf(root)
    return make_bundle(root / "bundle", dense, gguf, small_eval, "android")


@pytest.fixture
def adb(tmp_path, monkeypatch):
    """The stand-in adb on PATH; returns (its call log, the phone's folder, the run log of the pushed programs)."""
    bin_dir, phone = tmp_path / "host-bin", tmp_path / "phone"
    script(bin_dir / "adb", ADB)
    phone_bin = tmp_path / "phone-bin"  # what the phone's shell has that this machine does not
    script(phone_bin / "getprop", """#!/bin/sh
case "$1" in
    ro.product.model) echo "Pixel 8" ;; ro.product.manufacturer) echo Google ;; ro.soc.model) echo "Tensor G3" ;;
    ro.hardware) echo zuma ;; ro.build.version.release) echo 14 ;; ro.product.cpu.abi) echo arm64-v8a ;;
esac
""")
    script(phone_bin / "nproc", "#!/bin/sh\necho 8\n")
    log = tmp_path / "adb.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("STANDIN_ADB_LOG", str(log))
    monkeypatch.setenv("STANDIN_PHONE", str(phone))
    monkeypatch.setenv("STANDIN_PHONE_BIN", str(phone_bin))
    return log, phone, tmp_path / "programs.jsonl"


def android_build(root, programs_log, *, shared=True):
    """An install prefix as `cmake --install build-android --prefix DIR` leaves it: bin/, and lib/ when shared."""
    stand_in_llama_cpp(root / "bin", programs_log)
    if shared:
        for name in ("libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu.so"):
            (root / "lib").mkdir(exist_ok=True)
            (root / "lib" / name).write_bytes(b"\x7fELF stand-in library " + name.encode())
    return root


def adb_calls(log):
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def bench(bundle, *args):
    return CliRunner().invoke(main, ["bench", str(bundle), *args], catch_exceptions=False)


def test_adb_pushes_runs_and_pulls_like_llama_cpp_android_guide(bundle, adb, tmp_path):
    log, phone, programs = adb
    install = android_build(tmp_path / "install-android", programs)
    out = tmp_path / "results"
    result = bench(bundle, "--adb", "--llama-bench", str(install), "--out", str(out))
    assert result.exit_code == 0, result.output
    seen = adb_calls(log)
    assert seen[:2] == [["get-state"], ["get-serialno"]]
    pushes = {c[2]: c[1] for c in seen if c[0] == "push"}
    corpora = sorted(p.stem for p in (bundle / "eval").glob("*.txt"))
    assert set(pushes) == {f"{REMOTE}/student-F32.gguf", *(f"{REMOTE}/eval/{c}.txt" for c in corpora),
                           f"{REMOTE}/bin/llama-bench", f"{REMOTE}/bin/llama-perplexity",
                           *(f"{REMOTE}/lib/{n}" for n in ("libllama.so", "libggml.so", "libggml-base.so",
                                                           "libggml-cpu.so"))}
    assert pushes[f"{REMOTE}/student-F32.gguf"] == str(bundle / "student-F32.gguf")
    shells = [c[1] for c in seen if c[0] == "shell"]
    run = next(s for s in shells if "llama-bench -m" in s)
    assert run.startswith(f"cd {REMOTE} && LD_LIBRARY_PATH={REMOTE}/lib ./bin/llama-bench -m student-F32.gguf "
                          "-p 512 -n 128 -t 4 -o json > llama-bench.json 2> llama-bench.log")  # android: 4 threads
    assert any(c[0] == "pull" and c[1] == f"{REMOTE}/llama-bench.json" for c in seen)
    # What the pushed llama-bench saw on the "phone": its arguments and the library path.
    bench_call, *ppl = calls(programs)
    assert bench_call["ld"] == f"{phone}{REMOTE}/lib" and bench_call["argv"][:2] == ["-m", "student-F32.gguf"]
    assert [c["argv"][c["argv"].index("-f") + 1] for c in ppl] == [f"eval/{c}.txt" for c in corpora]
    where = out / "android-STANDIN01"
    assert json.loads((where / "llama-bench.json").read_text()) == CANNED
    side = json.loads((where / "llama-bench.edgeconv.json").read_text())
    assert side["device"]["android_model"] == "Google Pixel 8" and side["device"]["processor"] == "Tensor G3"
    assert side["device"]["abi"] == "arm64-v8a" and side["device"]["logical_cores"] == 8 and side["threads"] == 4
    assert side["verified"] is True and side["target"] == "android" and side["perplexity"] == {c: CANNED_PPL
                                                                                               for c in corpora}
    md = (where / "report" / "report.md").read_text()
    assert "Google Pixel 8" in md and "| tiny-dense | tg128 | 42.5 |" in md
    assert "tg128: 42.5" in result.output and f"results in {where}/" in result.output


def test_a_second_run_reuses_the_model_on_the_phone_and_serial_is_passed(bundle, adb, tmp_path):
    log, _, programs = adb
    install = android_build(tmp_path / "install", programs)
    first = bench(bundle, "--adb", "R5CT1234", "--llama-bench", str(install), "--out", str(tmp_path / "o"))
    assert first.exit_code == 0, first.output
    first = adb_calls(log)
    log.unlink()
    result = bench(bundle, "--adb", "R5CT1234", "--llama-bench", str(install), "--out", str(tmp_path / "o"),
                   "--threads", "2", "--quick")
    assert result.exit_code == 0, result.output
    again = adb_calls(log)
    assert all(c[:2] == ["-s", "R5CT1234"] for c in first + again)
    assert not any(c[2] == "push" and c[4].endswith((".gguf", ".txt")) for c in again)  # already there, same sha256
    assert any(c[2] == "push" and c[4].endswith(".gguf") for c in first)
    run = next(c[3] for c in again if c[2] == "shell" and "llama-bench -m" in c[3])
    assert "-t 2 -o json -r 2" in run
    assert (tmp_path / "o" / "android-R5CT1234" / "llama-bench.json").is_file()


def test_a_static_build_runs_without_ld_library_path(bundle, adb, tmp_path):
    log, _, programs = adb
    stand_in_llama_cpp(tmp_path / "static", programs)
    (tmp_path / "static" / "llama-perplexity").unlink()
    result = bench(bundle, "--adb", "--llama-bench", str(tmp_path / "static" / "llama-bench"), "--out",
                   str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    run = next(c[1] for c in adb_calls(log) if c[0] == "shell" and "llama-bench -m" in c[1])
    assert "LD_LIBRARY_PATH" not in run and calls(programs)[0]["ld"] is None
    side = json.loads((tmp_path / "o" / "android-STANDIN01" / "llama-bench.edgeconv.json").read_text())
    assert side["perplexity"] == {} and "no llama-perplexity next to" in side["notes"][0]


def test_an_x86_64_llama_bench_is_refused_for_an_arm_phone_before_any_push(bundle, adb, tmp_path):
    log, _, _ = adb
    fake = tmp_path / "llama-bench"
    fake.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(11) + (62).to_bytes(2, "little") + bytes(40))
    assert elf_machine(fake) == "x86_64" and find_programs(fake).libs == []
    result = CliRunner().invoke(main, ["bench", str(bundle), "--adb", "--llama-bench", str(fake)])
    assert result.exit_code == 2
    assert "is built for x86_64; the phone (arm64-v8a) needs aarch64" in result.output
    assert not any(c[0] == "push" for c in adb_calls(log))


def test_a_damaged_transfer_is_caught_with_the_phones_sha256sum(bundle, adb, tmp_path, monkeypatch):
    _, _, programs = adb
    monkeypatch.setenv("STANDIN_DAMAGE", "1")
    install = android_build(tmp_path / "install", programs)
    result = CliRunner().invoke(main, ["bench", str(bundle), "--adb", "--llama-bench", str(install)])
    assert result.exit_code == 2
    assert "student-F32.gguf on the phone does not match manifest.json after the push" in result.output
    assert not calls(programs)


def test_no_phone_and_a_modified_bundle_are_one_line_errors(bundle, adb, tmp_path, monkeypatch):
    log, _, programs = adb
    install = android_build(tmp_path / "install", programs)
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    (copy / "eval" / "pydocs.txt").write_text("not the text")
    result = CliRunner().invoke(main, ["bench", str(copy), "--adb", "--llama-bench", str(install)])
    assert result.exit_code == 2 and "does not match its manifest" in result.output and not log.exists()
    monkeypatch.setenv("STANDIN_NO_DEVICE", "1")
    result = CliRunner().invoke(main, ["bench", str(bundle), "--adb", "--llama-bench", str(install)])
    assert result.exit_code == 2 and "adb get-state failed: error: no devices/emulators found" in result.output
    result = CliRunner().invoke(main, ["bench", str(bundle), "--llama-bench", str(install)])
    assert result.exit_code == 2 and "--adb and --llama-bench go together" in result.output
