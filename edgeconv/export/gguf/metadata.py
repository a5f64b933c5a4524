"""The general.* metadata of a GGUF: what llama.cpp's convert_hf_to_gguf.py writes, and the lineage of the GGUF spec.

The model's own description comes from gguf-py's `Metadata`, the code llama.cpp's converter runs (its
`prepare_metadata`): the model card's front matter (license, tags, languages, base models, datasets), config.json's
`_name_or_path`, heuristics on the directory name (basename, finetune, version, size label) and
generation_config.json's sampling defaults (`general.sampling.*`). As upstream: `general.type` is `model`, the size
label falls back to one computed from the declared tensors (`16x4.5M`: experts x parameters per expert path), and
`general.quantization_version` is written (llama.cpp's quantizer rewrites it for quantized files).

edgeconv's additions (edgeconv.io.lineage): the base model of a model edgeconv made (a dense student, a pruned or an
upcycled model) is the model it was made from, `general.base_model.0.*` naming it as upstream names a card's hub id
(name, organization, repo_url) or, for a local directory, by that directory's name; `general.license` falls back to
the source's card or config; `general.finetune` says what edgeconv made (`dense`, `dense-distilled`, `pruned`,
`upcycled`) when the name says nothing. `general.name` is the name given (the build's artifact name), else the hub
id, else the directory name.

The importance-matrix keys (`quantize.imatrix.*`) are written by llama.cpp's quantizer (see llamacpp.quantize).
"""

from __future__ import annotations

import logging
from pathlib import Path

import gguf

from edgeconv.io.checkpoint import hub_id_of
from edgeconv.io.lineage import Lineage, lineage

FINETUNE = {"assemble": "dense", "distill": "dense-distilled", "prune": "pruned", "upcycle": "upcycled"}
HUB = "https://huggingface.co"


def base_model_entry(lin: Lineage, total_params: int = 0) -> dict:
    """general.base_model.N.* of the model `lin.source`: for a hub id what upstream derives from a card's
    `base_model` (name and organization title-cased, version, repo_url); for a directory, its name as it is."""
    if not lin.hub:
        return {"name": lin.source}
    full, org, _basename, _finetune, version, _size = gguf.Metadata.get_model_id_components(lin.source, total_params)
    entry = {"name": gguf.Metadata.id_to_title(full)}
    if org:
        entry["organization"] = gguf.Metadata.id_to_title(org)
    if version:
        entry["version"] = version
    entry["repo_url"] = f"{HUB}/{lin.source}"
    return entry


def model_metadata(writer: gguf.GGUFWriter, model_dir: Path, name: str | None = None) -> gguf.Metadata:
    """The general.* description of `model_dir` (call once the tensor infos are declared: the size label counts
    them)."""
    model_dir = Path(model_dir)
    total, shared, expert, count = writer.get_total_parameter_count()
    quiet = logging.getLogger("metadata")  # gguf-py's, which logs each heuristic at INFO
    level = quiet.level
    quiet.setLevel(max(level, logging.WARNING))
    try:
        meta = gguf.Metadata.load(None, model_dir, None, total)
    except Exception:  # an unreadable card or config: the rest of the metadata still describes the model
        meta = gguf.Metadata()
    finally:
        quiet.setLevel(level)
    hub = hub_id_of(model_dir)
    if hub:  # a snapshot in the HF cache: its directory is named by a commit hash, the repo name says the rest
        from_dir = gguf.Metadata.apply_metadata_heuristic(gguf.Metadata(), None, None, model_dir, total)
        from_repo = gguf.Metadata.apply_metadata_heuristic(gguf.Metadata(), None, None, Path(hub), total)
        for key in ("basename", "finetune", "version", "size_label"):
            if getattr(meta, key) == getattr(from_dir, key):
                setattr(meta, key, getattr(from_repo, key))
        meta.organization = meta.organization or gguf.Metadata.id_to_title(hub.split("/")[0])
    meta.name = name or hub or model_dir.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, count)
    lin = lineage(model_dir)
    if lin.source is not None:  # made by edgeconv: the model it was made from is its base model
        meta.base_models = [base_model_entry(lin, total)]
        meta.finetune = meta.finetune or FINETUNE.get(lin.stage)
    if meta.license is None and lin.license:
        meta.license = lin.license
    return meta


def add_general(writer: gguf.GGUFWriter, model_dir: Path, name: str | None = None) -> gguf.Metadata:
    """general.type and the model description, as llama.cpp's converter writes them before the architecture's keys."""
    meta = model_metadata(writer, model_dir, name)
    writer.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(writer)
    return meta
