"""Reading bench.py's results.json files (schema "edgeconv-bench/1") into validated records.

A file holds one result, a JSON list of results, or an `edgeconv bench --teacher` comparison
{"student": result, "teacher": result, ...}; or it is llama.cpp's `llama-bench -o json` / `-o jsonl` output (from
bench.sh, `edgeconv bench --adb` or your own run), read by edgeconv.reporting.llama_bench. Anything else is refused
with one line naming the file and the field.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeconv.errors import EdgeconvError
from edgeconv.reporting import llama_bench

SCHEMA = "edgeconv-bench/1"
HINT = "pass results.json files written by bench.py, or llama-bench JSON (-o json or jsonl)"


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Speed(_Open):
    prompt_tokens: int
    ttft_ms: float | None = None
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None


class Accuracy(_Open):
    perplexity: dict[str, float | None] = Field(default_factory=dict)
    exact_match: dict[str, float] = Field(default_factory=dict)
    exact_match_mean: float | None = None
    choice_acc: float | None = None
    choice_acc_norm: float | None = None
    settings: dict = Field(default_factory=dict)


class ModelInfo(_Open):
    path: str = ""
    format: str | None = None
    bytes: int | None = None
    quant: str | None = None


class RuntimeInfo(_Open):
    name: str | None = None
    version: str | None = None
    threads: int | None = None
    gpu_layers: int | None = None
    context: int | None = None


class BenchResult(_Open):
    schema_: str = Field(alias="schema")
    label: str
    role: str = "student"
    target: str | None = None
    model: ModelInfo = Field(default_factory=ModelInfo)
    device: dict = Field(default_factory=dict)
    runtime: RuntimeInfo = Field(default_factory=RuntimeInfo)
    load_s: float | None = None
    rss_after_load_mb: float | None = None
    peak_rss_mb: float | None = None
    speed: list[Speed] = Field(default_factory=list)
    decode_tok_s: float | None = None
    accuracy: Accuracy | None = None
    notes: list[str] = Field(default_factory=list)
    started: str | None = None
    seconds: float | None = None
    llama_bench: list[dict] | None = None  # llama-bench's own tests, when the result was read from its output
    source: str = ""  # the file it was read from (not part of bench.py's schema)

    @property
    def first_speed(self) -> Speed | None:
        """The speed row at the shortest prompt length (what the headline decode tokens/s is measured at)."""
        return min(self.speed, key=lambda s: s.prompt_tokens) if self.speed else None

    @property
    def decode(self) -> float | None:
        if self.decode_tok_s is not None:
            return self.decode_tok_s
        first = self.first_speed
        return first.decode_tok_s if first else None

    @property
    def model_mb(self) -> float | None:
        return self.model.bytes / 1e6 if self.model.bytes is not None else None

    def metric(self, name: str) -> float | None:
        acc = self.accuracy
        if name == "choice_acc":
            return acc.choice_acc if acc else None
        if name == "exact_match_mean":
            return acc.exact_match_mean if acc else None
        if name.startswith("perplexity:"):
            return acc.perplexity.get(name.split(":", 1)[1]) if acc else None
        raise KeyError(name)

    @property
    def device_name(self) -> str:
        """Short: the board (Jetson, phone) or the CPU, plus the GPU when layers were offloaded to it."""
        d = self.device
        name = d.get("jetson_model") or d.get("android_model") or d.get("processor") or d.get("machine") or "?"
        gpus = d.get("gpu") or []
        if gpus and self.runtime.gpu_layers:
            name += f" + {gpus[0].split(',')[0]}"
        return str(name)

    @property
    def power(self) -> str | None:
        """A Jetson's power state as bench.py and bench.sh record it ("nvpmodel MAXN (0), jetson_clocks on"); None
        where neither nvpmodel nor jetson_clocks was installed."""
        parts = []
        nvp, clocks = self.device.get("nvpmodel"), self.device.get("jetson_clocks")
        if isinstance(nvp, dict):
            mode_id = f" ({nvp['id']})" if nvp.get("id") is not None else ""
            parts.append(f"nvpmodel {nvp.get('mode') or 'unknown'}{mode_id}")
        if isinstance(clocks, dict):
            parts.append("jetson_clocks " + {True: "on", False: "off"}.get(clocks.get("on"), "unknown"))
        return ", ".join(parts) or None

    @property
    def device_key(self) -> tuple:
        """What makes two results comparable as "the same machine"."""
        d = self.device
        return (d.get("hostname"), d.get("processor"), d.get("machine"), d.get("jetson_model"),
                d.get("android_model"), tuple(d.get("gpu") or ()))


def load_results(paths: list[Path]) -> list[BenchResult]:
    """Every result in `paths`, in order; raises EdgeconvError with one line on a file that is not one."""
    if not paths:
        raise EdgeconvError("no results files given", "pass one or more results.json files written by bench.py")
    out: list[BenchResult] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise EdgeconvError(f"{path} does not exist" if not path.exists() else f"{path} is not a file",
                                "pass results.json files written by bench.py")
        try:
            text = path.read_text(encoding="utf-8")
            recs = llama_bench.records(text)  # llama.cpp's llama-bench -o json / jsonl
            if recs is not None:
                out += [_parse(path, "", raw, None) for raw in llama_bench.to_results(recs, path)]
                continue
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            where = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
            raise EdgeconvError(f"{path} is not valid JSON{where}", HINT)
        for where, raw, role in _entries(path, data):
            out.append(_parse(path, where, raw, role))
    # The same run read twice (a comparison file next to the results files it was made from) counts once.
    seen, unique = set(), []
    for r in out:
        key = (r.label, r.role, r.target, r.started, r.model.path, r.seconds, json.dumps(r.device, sort_keys=True))
        if key not in seen:
            seen.add(key)
            unique.append(r)
    return unique


def _entries(path: Path, data) -> list[tuple[str, object, str | None]]:
    """(location inside the file, raw result, role implied by the location) for each result in one file."""
    if isinstance(data, list):
        if not data:
            raise EdgeconvError(f"{path} holds an empty list", "pass results.json files written by bench.py")
        return [(f"[{i}]", item, None) for i, item in enumerate(data)]
    if isinstance(data, dict) and "schema" not in data and ("student" in data or "teacher" in data):
        return [(f"[{role!r}]", data[role], role) for role in ("teacher", "student") if data.get(role) is not None]
    return [("", data, None)]


def _parse(path: Path, where: str, raw, role: str | None) -> BenchResult:
    hint = "pass results.json files written by bench.py (schema edgeconv-bench/1)"
    if not isinstance(raw, dict):
        raise EdgeconvError(f"{path}{where} is not a results object but {type(raw).__name__}", hint)
    if raw.get("schema") != SCHEMA:
        found = raw.get("schema")
        raise EdgeconvError(f"{path}{where} is not an edgeconv-bench/1 result"
                            + (f" (schema {found!r})" if found else " (no schema key)"), hint)
    try:
        result = BenchResult.model_validate({**raw, "source": str(path)})
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "?"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise EdgeconvError(f"{path}{where}: field {loc}: {err['msg'].lower()}{more}", hint)
    if role:  # in a comparison file the key says which side it is
        result.role = role
    return result
