"""edgeconv: turn a Mixture-of-Experts LLM into a small dense model for the edge (the public API: edgeconv.api)."""

# The Python API is the CLI's: one function per command (edgeconv.api), each taking the model and output paths
# and a config (edgeconv.config) or keyword options that build one::
#
#     import edgeconv
#
#     student = edgeconv.convert("demo-moe", "dense/", tokens=4096)
#     gguf = edgeconv.export(student.out, "dense-Q8_0.gguf", quant="Q8_0")
#
# Problems with the input raise EdgeconvError (one line, `.problem` and `.hint`); a refused option is a ConfigError
# that names the config field. Importing edgeconv is light: torch and transformers load when a function runs.
#
# `edgeconv.export` is both the export function and the package of exporters (edgeconv/export/: gguf, onnx,
# parity): the package is callable, so `from edgeconv import export; export(model, out)` and
# `import edgeconv.export.parity` both work.
__version__ = "0.1.0"

import types as _types  # noqa: E402

from edgeconv import compat as _compat  # noqa: E402

_compat.install()  # fixes to the pinned transformers, applied when their modules are imported (edgeconv.compat)

from edgeconv import api as _api  # noqa: E402
from edgeconv.api import build, build_plan, convert, distill, evaluate, prune, sweep, upcycle  # noqa: E402
from edgeconv.config import BuildConfig, ConfigError, ConvertConfig, DistillConfig, ExportConfig, SweepConfig  # noqa: E402
from edgeconv.errors import EdgeconvError  # noqa: E402


class _ExportPackage(_types.ModuleType):
    """The edgeconv.export package, callable as edgeconv.api.export (a plain function of that name would be
    replaced by the package the first time any of its modules is imported)."""

    def __call__(self, model, out, config=None, *, force=False, **options):
        return _api.export(model, out, config, force=force, **options)


from edgeconv import export  # noqa: E402  (the package, made callable next)

export.__class__ = _ExportPackage
export.__doc__ = (export.__doc__ or "") + "\n\nCalled, it is edgeconv.api.export:\n\n" + (_api.export.__doc__ or "")
_ExportPackage.__call__.__doc__ = _api.export.__doc__

__all__ = ["convert", "build", "build_plan", "distill", "export", "evaluate", "upcycle", "prune", "sweep",
           "EdgeconvError", "ConfigError", "ConvertConfig", "BuildConfig", "DistillConfig", "ExportConfig",
           "SweepConfig", "__version__"]
