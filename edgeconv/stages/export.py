"""Export + parity as a stage (the build's): the student exported to GGUF or onnxruntime-genai into OUT.work/export,
published only after its logits passed the parity check against torch (edgeconv/export/parity.py).

Keyed by the sha256 of the student's manifest.json (which holds every key before it) and the format and
quantization. The exporters themselves are export_gguf.py and export_onnx.py; `edgeconv export` calls them
directly, since its --out is a file (GGUF, with its parity report, Modelfile and card beside it) or a directory
it refuses to replace without --force, where a stage would skip an up-to-date output.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from edgeconv.io.output_dir import read_manifest, sha256_file
from edgeconv.stages.stage import Identity, StageBase, StageResult

logger = logging.getLogger(__name__)

STAGE = "build-export"


class ExportStage(StageBase):
    name = STAGE
    label = "export + parity"
    force_redoes = True
    replaces = True  # OUT.work/export is the build's own

    def __init__(self, student: Path, out: Path, *, name: str, fmt: str, quant: str, execution_provider: str = "cpu"):
        self.student, self.out, self.artifact_name, self.fmt, self.quant = Path(student), Path(out), name, fmt, quant
        self.provider = execution_provider  # onnx-genai: what the model is built for (edgeconv.device.bundle_runtime)

    @property
    def artifact(self) -> Path:
        """The exported model in `out`: NAME-QUANT.gguf, or the onnxruntime-genai directory model/."""
        return self.out / (f"{self.artifact_name}-{self.quant}.gguf" if self.fmt == "gguf" else "model")

    def describe(self) -> str:
        built = f" for the {self.provider.upper()} execution provider" if self.fmt == "onnx-genai" else ""
        return (f"{self.fmt} {self.quant}{built}; artifact logits vs the torch student, within the tolerance of "
                f"{self.quant}")

    def identity(self) -> Identity:
        options = {"format": self.fmt, "quant": self.quant, "name": self.artifact_name}
        if self.fmt == "onnx-genai" and self.provider != "cpu":  # cpu: the key builds made before it was an option
            options["execution_provider"] = self.provider
        return Identity({"student": sha256_file(self.student / "manifest.json")}, options,
                        {"student": str(self.student)})

    def run(self, tmp: Path) -> dict:
        if self.fmt == "gguf":
            from edgeconv.stages.export_gguf import export_gguf

            export_gguf(self.student, tmp / self.artifact.name, self.quant, name=self.artifact_name)
        else:
            from edgeconv.stages.export_onnx import export_onnx_genai

            export_onnx_genai(self.student, tmp / self.artifact.name, self.quant, execution_provider=self.provider)
        return {}

    def parity(self) -> dict:
        """The parity report of the published artifact (an ONNX directory's parity.json, else its manifest's
        summary)."""
        if self.fmt == "gguf":
            return json.loads(self.artifact.with_suffix(".parity.json").read_text())
        try:
            return json.loads((self.artifact / "parity.json").read_text())
        except (OSError, ValueError):
            pass
        manifest = read_manifest(self.artifact) or {}
        return manifest.get("summary", manifest)

    def done(self, result: StageResult) -> None:
        logger.info(f"      parity: {parity_line(self.parity())}")


def parity_line(parity: dict) -> str:
    ratio = parity.get("ppl_ratio")
    top1 = parity.get("top1_agreement")
    parts = []
    if ratio is not None:
        parts.append(f"perplexity ratio {ratio:.4f} vs torch")
    if top1 is not None:
        parts.append(f"top-1 agreement {top1:.1%}")
    return (", ".join(parts) or "see parity.json") + " (passed the tolerance of the format)"
