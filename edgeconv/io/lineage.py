"""Where a checkpoint comes from: the model it was made from, that model's license, and what edgeconv did to it.

Read from what is on disk: the `manifest.json` of the edgeconv stage that wrote the checkpoint (its `stage`, and
the source it recorded: assemble's `model`, distill's `teacher`, prune's and upcycle's `model`) and the model cards
(README.md front matter) of the checkpoint and of its source. A model is named by its hub id when it came from the
hub (a snapshot in the Hugging Face cache), else by its directory name (`edgeconv.io.checkpoint.model_id`). The
GGUF writer turns this into `general.base_model.*` and `general.license`; the model cards into `base_model` and
`license`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgeconv.io.checkpoint import hub_id_of, model_id
from edgeconv.io.output_dir import read_manifest

CARD = "README.md"
# The edgeconv stages that write a model made from another one, and the manifest input that records that one.
SOURCE_INPUT = {"assemble": "model", "distill": "teacher", "prune": "model", "upcycle": "model"}


def card_data(directory: str | Path) -> dict:
    """The YAML front matter of `directory`/README.md as a dict ({} when there is none or it does not parse)."""
    path = Path(directory) / CARD
    if not path.is_file():
        return {}
    try:
        from huggingface_hub import metadata_load

        return metadata_load(path) or {}
    except Exception:  # a card is documentation: a malformed one costs its metadata, never the export
        return {}


def license_of(directory: str | Path, config: dict | None = None) -> str | None:
    """The license a checkpoint declares: its card's `license` (a list is joined with commas, as llama.cpp's
    converter does), else a `license` in its config.json; None when neither says."""
    value = card_data(directory).get("license")
    if not value:
        if config is None:
            try:
                config = json.loads((Path(directory) / "config.json").read_text())
            except (OSError, ValueError):
                config = {}
        value = config.get("license") if isinstance(config, dict) else None
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    return str(value) if value else None


@dataclass(frozen=True)
class Lineage:
    """What a checkpoint was made from. `source` is None for a model edgeconv did not make (a teacher as released)."""

    source: str | None  # the model it was made from: its hub id, else its directory name
    hub: bool  # `source` is a hub id
    license: str | None  # this checkpoint's license: its own card's, else its source's (card or config)
    stage: str | None  # the edgeconv stage that wrote it: assemble, distill, prune or upcycle

    @property
    def distilled(self) -> bool:
        return self.stage == "distill"


def lineage(directory: str | Path, manifest: dict | None = None) -> Lineage:
    """The lineage of the checkpoint in `directory`, from its manifest (when edgeconv wrote it; `manifest`: the one
    a stage is about to write) and the cards."""
    manifest = manifest if manifest is not None else (read_manifest(Path(directory)) or {})
    stage = manifest.get("stage")
    recorded = (manifest.get("inputs") or {}).get(SOURCE_INPUT.get(stage, ""))
    if not recorded:
        return Lineage(None, False, license_of(directory), None)
    own = license_of(directory)
    source = Path(recorded)
    return Lineage(model_id(source), hub_id_of(source) is not None,
                   own or (license_of(source) if source.is_dir() else None), stage)
