"""The public Python API (edgeconv/__init__.py): every name in __all__ imports and is documented, `import edgeconv`
stays light, the CLI calls the same functions, and the README's example runs."""

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from click.testing import CliRunner

import edgeconv
from edgeconv.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
FUNCTIONS = ("convert", "build", "distill", "export", "evaluate", "upcycle", "prune")


def test_everything_in_all_imports_and_is_documented():
    names = {}
    exec("from edgeconv import *", names)
    assert set(edgeconv.__all__) <= set(names)
    for required in (*FUNCTIONS, "EdgeconvError", "ConvertConfig", "BuildConfig", "DistillConfig", "ExportConfig",
                     "SweepConfig"):
        assert required in edgeconv.__all__, required
    for name in edgeconv.__all__:
        assert getattr(edgeconv, name).__doc__, name
    for name in FUNCTIONS:  # what it writes, its arguments, what it returns
        doc = getattr(edgeconv.api, name).__doc__
        assert "Args:" in doc and "Returns:" in doc, name
    assert issubclass(edgeconv.ConfigError, edgeconv.EdgeconvError)


def test_import_is_light_and_export_is_both_function_and_package():
    code = ("import sys; from edgeconv import convert, build, distill, export, evaluate, EdgeconvError; "
            "heavy = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
    import edgeconv.export.parity  # noqa: F401  (the package's modules still import)

    assert callable(edgeconv.export) and edgeconv.export.parity.ReferenceOptions


def test_the_cli_calls_the_api(monkeypatch, tmp_path):
    calls = []

    def fake(model, out, config, **kw):
        calls.append((model, out, config, kw))
        summary = {"dense_architecture": "X", "dense_width": 8, "dense_params": 1e6, "source_params": 4e6}
        return SimpleNamespace(out=out, distilled=None, manifest={"summary": summary})

    monkeypatch.setattr(edgeconv.api, "convert", fake)
    result = CliRunner().invoke(main, ["convert", "m", "--out", str(tmp_path / "d"), "--tokens", "1024",
                                       "--distill-lr", "1e-3", "--no-progress"])
    assert result.exit_code == 0, result.output
    [(model, out, config, kw)] = calls
    assert model == "m" and out == tmp_path / "d" and kw == {"force": False, "progress": False}
    assert config == edgeconv.ConvertConfig(tokens=1024, distill_lr=1e-3)


def readme_example(markdown: str) -> str:
    """The first ```python block after the `## Python API` heading."""
    section = markdown.split("\n## Python API\n", 1)
    assert len(section) == 2, "README.md has no `## Python API` section"
    block = re.search(r"^```python\n(.*?)^```", section[1].split("\n## ", 1)[0], re.S | re.M)
    assert block, "README.md's `## Python API` section has no ```python block"
    return block.group(1)


def run_example(code: str, where: Path) -> None:
    import os

    cwd = os.getcwd()
    os.chdir(where)
    try:
        exec(compile(code, "README.md (## Python API)", "exec"), {"__name__": "__main__"})
    finally:
        os.chdir(cwd)


def test_the_readme_example_runs(tmp_path, capsys):
    run_example(readme_example(README.read_text()), tmp_path)
    printed = capsys.readouterr().out
    assert printed.strip(), "the example prints what it made"
    assert any(tmp_path.iterdir()), "the example writes under its working directory"
