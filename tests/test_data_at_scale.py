"""Data at scale (issue 18, point 4): parquet files and directories and `datasets` save_to_disk directories as
--data, and the memory-mapped token stream that calibration, distillation and the importance matrix read through.

The stream must give exactly the ids of the packing it replaced: `_reference_token_sequences` and
`_reference_pack_tokens` below are the implementations before the stream (everything in memory), kept as the
reference.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiny
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer

from edgeconv.cli import main
from edgeconv.errors import EdgeconvError
from edgeconv.io import text_data as data_mod
from edgeconv.io import token_stream as ts
from edgeconv.io.text_data import iter_documents, token_sequences
from edgeconv.training.packing import pack_tokens

# --- the reference: packing as it was before the token stream ----------------------------------------------------

def _reference_token_sequences(tokenizer, path, tokens, seq_len):
    n = -(-tokens // seq_len)
    need = n * seq_len
    eos = tokenizer.eos_token_id
    ids, sources = [], []
    for source, text in iter_documents(path):
        if not text.strip():
            continue
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        sources.append(source)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise EdgeconvError(f"calibration data {path} gives only {len(ids)} tokens, {need} are needed "
                            f"({n} sequences of {seq_len})", "add text, or lower --tokens / --seq-len")
    data = torch.tensor(ids[:need], dtype=torch.long).view(n, seq_len)
    return data, {"path": str(path), "tokens": need, "seq_len": seq_len, "sequences": n, "documents": len(sources)}


def _reference_pack_tokens(tokenizer, path, sequences, seq_len, batch_size=1, budget=""):
    need = sequences * seq_len
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    parts, chunk = [], []
    count = documents = 0

    def flush():
        nonlocal count, documents
        for row in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
            parts.append(np.asarray(row + eos, dtype=np.int32))
            count += len(parts[-1])
            documents += 1
        chunk.clear()

    for _, text in iter_documents(Path(path)):
        if text.strip():
            chunk.append(text)
        if len(chunk) >= 64:
            flush()
            if count >= need:
                break
    if chunk:
        flush()
    if count < need:
        per_step = batch_size * seq_len
        fits = count // per_step * per_step
        raise EdgeconvError(
            f"--data {path} has {count:,} tokens ({documents} documents), the token budget needs {need:,}"
            + (f" ({budget})" if budget else ""),
            f"add text, or lower --tokens to at most {fits:,}" if fits else
            "add text, or lower --batch-size or --seq-len",
        )
    data = torch.from_numpy(np.concatenate(parts)[:need].copy()).view(sequences, seq_len)
    info = {"path": str(path), "tokens": need, "seq_len": seq_len, "sequences": sequences, "documents": documents,
            "sha256": hashlib.sha256(data.numpy().tobytes()).hexdigest()}
    return data, info


# --- fixtures -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("data-at-scale")


@pytest.fixture(scope="module")
def teacher(root):
    """A tiny Qwen3-MoE with its tokenizer."""
    return tiny.add_tokenizer(tiny.save(tiny.build_model("Qwen3MoeForCausalLM", seed=3), root / "moe"))


@pytest.fixture(scope="module")
def tokenizer(teacher):
    return AutoTokenizer.from_pretrained(teacher)


@pytest.fixture(scope="module")
def corpus(root):
    """200 documents of JSONL, about 18k tokens."""
    return tiny.write_corpus(root / "corpus.jsonl", docs=200)


@pytest.fixture(scope="module")
def docs(corpus):
    return [json.loads(line)["text"] for line in corpus.read_text().splitlines()]


@pytest.fixture(scope="module")
def sources(root, docs):
    """The corpus's documents in every tabular form: kind -> path (the datasets kinds where it is installed)."""
    ids = list(range(len(docs)))
    out = {}
    # One parquet file with many row groups and another column beside `text`.
    out["parquet"] = root / "corpus.parquet"
    pq.write_table(pa.table({"id": ids, "text": docs}), out["parquet"], row_group_size=16)
    # A directory of parquet files as Spark or datasets' to_parquet shard them, with a marker file beside them.
    d = root / "parquet-dir"
    (d / "b").mkdir(parents=True)
    pq.write_table(pa.table({"text": docs[:70]}), d / "a-00000.parquet", row_group_size=32)
    pq.write_table(pa.table({"text": docs[70:150]}), d / "a-00001.parquet")
    pq.write_table(pa.table({"text": pa.array(docs[150:], pa.large_string())}), d / "b" / "part-0.parquet")
    (d / "_SUCCESS").write_text("")
    out["parquet-dir"] = d
    try:
        import datasets
    except ImportError:  # edgeconv reads these directories with pyarrow; writing them needs datasets
        return out
    # datasets: a Dataset saved in three shards, and a DatasetDict (its train split is read).
    ds = datasets.Dataset.from_dict({"text": docs, "id": ids})
    out["dataset"] = root / "dataset"
    ds.save_to_disk(str(out["dataset"]), num_shards=3)
    out["dataset-dict"] = root / "dataset-dict"
    datasets.DatasetDict({"train": ds, "test": ds.select(range(5))}).save_to_disk(str(out["dataset-dict"]))
    return out


@pytest.fixture(scope="module")
def student(teacher, root):
    from edgeconv.families import family_for
    from edgeconv.planning.calibration_free import simple_plan
    from edgeconv.stages.assemble import assemble

    out = root / "dense"
    assemble(teacher, simple_plan(family_for(tiny.config_of(teacher)), "ids:1,4"), out, progress=False)
    return out


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *phrases):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])


# --- the token stream equals today's packing ---------------------------------------------------------------------

@pytest.mark.parametrize("tokens,seq_len", [(1, 2), (512, 32), (3000, 64), (18176, 32)])
def test_calibration_sequences_from_the_stream_equal_todays(tokenizer, corpus, tmp_path, tokens, seq_len):
    want, want_info = _reference_token_sequences(tokenizer, corpus, tokens, seq_len)
    for cache in (None, tmp_path / "tokens"):
        got, info = token_sequences(tokenizer, corpus, tokens, seq_len, cache)
        assert got.dtype == torch.long and torch.equal(got, want) and info == want_info
        assert hashlib.sha256(got.numpy().tobytes()).hexdigest() == hashlib.sha256(want.numpy().tobytes()).hexdigest()


def test_too_little_calibration_data_is_refused_as_before(tokenizer, corpus):
    with pytest.raises(EdgeconvError) as want:
        _reference_token_sequences(tokenizer, corpus, 20000, 32)
    with pytest.raises(EdgeconvError) as got:
        token_sequences(tokenizer, corpus, 20000, 32)
    assert got.value.line() == want.value.line() and "gives only 18177 tokens" in got.value.line()


@pytest.mark.parametrize("batch_docs", [1, 5, 64, 1000])
def test_distillation_ids_from_the_stream_equal_todays(tokenizer, corpus, tmp_path, monkeypatch, batch_docs):
    # The writer's batch of documents (what it holds in memory) changes nothing: ids, sha256, documents.
    monkeypatch.setattr(ts, "BATCH_DOCS", batch_docs)
    for sequences in (1, 10, 63, 100, 567):
        want, want_info = _reference_pack_tokens(tokenizer, corpus, sequences, 32)
        got, info = pack_tokens(tokenizer, corpus, sequences, 32, cache_dir=tmp_path / f"tokens-{sequences}")
        assert got.dtype == torch.int32 and got.shape == want.shape and torch.equal(got, want)
        assert info == want_info, (sequences, info, want_info)
    assert info["sha256"] == hashlib.sha256(want.numpy().tobytes()).hexdigest()
    budget = "--tokens 19200 = 150 steps x --batch-size 4 x --seq-len 32"
    with pytest.raises(EdgeconvError) as want_err:
        _reference_pack_tokens(tokenizer, corpus, 600, 32, 4, budget)
    with pytest.raises(EdgeconvError) as got_err:
        pack_tokens(tokenizer, corpus, 600, 32, 4, budget)
    assert got_err.value.line() == want_err.value.line()
    assert "has 18,177 tokens (200 documents)" in got_err.value.line()


def _mappings(path: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(str(path)):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_distillation_ids_are_a_copy_on_write_memory_map_of_the_stream(tokenizer, corpus, tmp_path):
    cache = tmp_path / "tokens"
    ids, info = pack_tokens(tokenizer, corpus, 100, 32, cache_dir=cache)
    (stream_dir,) = [p for p in cache.iterdir() if p.is_dir()]
    tokens_file = stream_dir / ts.TOKENS_FILE
    ptr = ids.data_ptr()
    assert any(lo <= ptr < hi for lo, hi in _mappings(tokens_file)), "the ids are not the mapped stream file"
    want, _ = _reference_pack_tokens(tokenizer, corpus, 100, 32)
    rows = torch.tensor([7, 0, 99])
    assert torch.equal(ids[rows], want[rows]) and torch.equal(ids[torch.from_numpy(np.array([3, 5]))], want[[3, 5]])
    before = tokens_file.read_bytes()
    ids[0, 0] = 12345  # stays in this process: the file, and so the next run, keep the data's ids
    assert tokens_file.read_bytes() == before
    assert pack_tokens(tokenizer, corpus, 100, 32, cache_dir=cache)[1]["sha256"] == info["sha256"]


def test_the_stream_file_layout_and_sidecar(tokenizer, corpus, tmp_path):
    cache = tmp_path / "tokens"
    _, info = pack_tokens(tokenizer, corpus, 567, 32, cache_dir=cache)
    (stream_dir,) = [p for p in cache.iterdir() if p.is_dir()]
    meta = json.loads((stream_dir / ts.META_FILE).read_text())
    raw = np.fromfile(stream_dir / ts.TOKENS_FILE, dtype="<u4")
    ends = np.fromfile(stream_dir / ts.DOCS_FILE, dtype="<u8")
    assert meta["tokens"] == len(raw) == 18177 and meta["documents"] == len(ends) == 200 and meta["complete"]
    assert meta["dtype"] == "uint32" and meta["eos_token_id"] == tokenizer.eos_token_id == 0
    assert meta["sha256"] == hashlib.sha256(raw.tobytes()).hexdigest()
    assert (raw[ends - 1] == tokenizer.eos_token_id).all() and ends[-1] == len(raw)  # each document ends with EOS
    assert hashlib.sha256(raw[:567 * 32].tobytes()).hexdigest() == info["sha256"]
    assert meta["source"]["files"] == 1 and meta["source"]["bytes"] == corpus.stat().st_size
    assert meta["tokenizer"]["class"] == "PreTrainedTokenizerFast"
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == [f".{meta['key']}.lock"]  # no temp left


# --- reuse, and bounded memory while writing ----------------------------------------------------------------------

def test_a_rerun_maps_the_stream_instead_of_tokenizing(tokenizer, corpus, tmp_path, monkeypatch):
    cache = tmp_path / "tokens"
    builds = []
    real_build = ts._build
    monkeypatch.setattr(ts, "_build", lambda *a, **k: builds.append(a[2]) or real_build(*a, **k))
    ids, info = pack_tokens(tokenizer, corpus, 10, 32, cache_dir=cache)
    (stream_dir,) = [p for p in cache.iterdir() if p.is_dir()]
    sidecar = stream_dir / ts.META_FILE
    meta, stamp = json.loads(sidecar.read_text()), sidecar.stat().st_mtime_ns
    assert builds == [320] and not meta["complete"] and meta["documents"] == 64  # stopped past 320 tokens

    # Again, a smaller budget, and calibration on the same data and tokenizer: no tokenizing.
    again, again_info = pack_tokens(tokenizer, corpus, 10, 32, cache_dir=cache)
    assert torch.equal(again, ids) and again_info == info
    assert torch.equal(token_sequences(tokenizer, corpus, 200, 32, cache)[0],
                       _reference_token_sequences(tokenizer, corpus, 200, 32)[0])
    assert builds == [320] and sidecar.stat().st_mtime_ns == stamp

    # More than the incomplete stream holds: built again, longer, in place; then reused for what it holds.
    big, big_info = pack_tokens(tokenizer, corpus, 300, 32, cache_dir=cache)
    assert builds == [320, 9600] and big_info == _reference_pack_tokens(tokenizer, corpus, 300, 32)[1]
    assert torch.equal(pack_tokens(tokenizer, corpus, 10, 32, cache_dir=cache)[0], ids) and len(builds) == 2
    assert [p.name for p in cache.iterdir() if p.is_dir()] == [stream_dir.name]

    # Other data (the file changed) or another tokenizer: another stream.
    with open(corpus.with_name("more.jsonl"), "w") as fh:
        fh.write(corpus.read_text() + json.dumps({"text": "one more document"}) + "\n")
    pack_tokens(tokenizer, corpus.with_name("more.jsonl"), 10, 32, cache_dir=cache)
    assert len(builds) == 3 and len([p for p in cache.iterdir() if p.is_dir()]) == 2


def test_a_damaged_or_partial_stream_is_built_again(tokenizer, corpus, tmp_path):
    cache = tmp_path / "tokens"
    _, info = pack_tokens(tokenizer, corpus, 100, 32, cache_dir=cache)
    (stream_dir,) = [p for p in cache.iterdir() if p.is_dir()]
    with open(stream_dir / ts.TOKENS_FILE, "r+b") as fh:  # cut short, as by a full disk
        fh.truncate(1000)
    (cache / f".{stream_dir.name}.tmp-999999").mkdir()  # a killed build's temp directory
    again, again_info = pack_tokens(tokenizer, corpus, 100, 32, cache_dir=cache)
    assert again_info == info and (stream_dir / ts.TOKENS_FILE).stat().st_size > 1000
    assert not list(cache.glob("*.tmp-*"))


def test_an_unwritable_token_cache_is_refused_in_one_line(tokenizer, corpus, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory would be")
    with pytest.raises(EdgeconvError, match="cannot create the token cache .*choose a writable output directory"):
        pack_tokens(tokenizer, corpus, 10, 32, cache_dir=blocker / "tokens")


def test_the_writer_holds_one_batch_of_documents_not_the_stream(tokenizer, corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(ts, "BATCH_DOCS", 4)
    calls = []
    real_call = type(tokenizer).__call__

    def spy(self, text, *args, **kwargs):
        calls.append(len(text) if isinstance(text, list) else 1)
        return real_call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", spy)
    ids, _ = pack_tokens(tokenizer, corpus, 567, 32, cache_dir=tmp_path / "tokens")
    monkeypatch.undo()
    assert torch.equal(ids, _reference_pack_tokens(tokenizer, corpus, 567, 32)[0])
    (stream_dir,) = [p for p in (tmp_path / "tokens").iterdir() if p.is_dir()]
    meta = json.loads((stream_dir / ts.META_FILE).read_text())
    ends = np.concatenate([[0], np.fromfile(stream_dir / ts.DOCS_FILE, dtype="<u8")])
    per_batch = ends[4::4] - ends[:-4:4]  # the tokens of each batch of 4 documents
    assert max(calls) == 4 and meta["build"]["peak_buffer_tokens"] == per_batch.max()
    assert meta["build"]["peak_buffer_tokens"] * 40 < meta["tokens"]  # 200 documents, never more than 4 at once


def test_long_documents_raise_no_transformers_warning(tokenizer, tmp_path, capfd, caplog):
    # A document longer than the tokenizer's model_max_length is meant here: it is cut into sequences.
    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path, model_max_length=16)
    long = tmp_path / "long.txt"
    long.write_text(tiny.CORPUS * 5)
    token_sequences(tokenizer, long, 64, 32)
    pack_tokens(tokenizer, long, 2, 32)
    assert "longer than the specified maximum" not in capfd.readouterr().err + caplog.text


def test_the_shipped_calibration_text_tokenizes_quietly(tmp_path):
    """Issue 21: calibration of demo-moe on the shipped text (one document is 1,393 tokens, the demo tokenizer's
    model_max_length 1,024) must not print transformers' too-long warning: whole documents are meant."""
    import logging

    from edgeconv.demo import CALIBRATION_DATA
    from edgeconv.io.checkpoint import resolve_model_path

    class Records(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    seen = Records()
    log = logging.getLogger("transformers")  # transformers' own handler writes to stderr, this one records too
    log.addHandler(seen)
    try:
        demo = resolve_model_path("demo-moe")
        token_sequences(AutoTokenizer.from_pretrained(demo), CALIBRATION_DATA, 8192, 512, cache_dir=tmp_path)
        assert not [m for m in seen.messages if "longer than the specified maximum" in m]
        # The same tokenizer called plainly on that text does warn: the check above would see it.
        longest = max((text for _, text in iter_documents(CALIBRATION_DATA)), key=len)
        AutoTokenizer.from_pretrained(demo)(longest)
        assert [m for m in seen.messages if "longer than the specified maximum" in m]
    finally:
        log.removeHandler(seen)


# --- tables as --data ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["parquet", "parquet-dir", "dataset", "dataset-dict"])
def test_tables_read_the_same_documents_and_tokens_as_jsonl(kind, sources, docs, tokenizer, corpus):
    if kind not in sources:
        pytest.skip("writing a datasets directory needs datasets")
    path = sources[kind]
    data_mod.check_data(path)
    assert [text for _, text in iter_documents(path)] == docs
    for tokens, seq_len in ((512, 32), (18000, 64)):
        want, want_info = token_sequences(tokenizer, corpus, tokens, seq_len)
        got, info = token_sequences(tokenizer, path, tokens, seq_len)
        assert torch.equal(got, want) and {**info, "path": "-"} == {**want_info, "path": "-"}
    want, want_info = pack_tokens(tokenizer, corpus, 500, 32)
    got, info = pack_tokens(tokenizer, path, 500, 32)
    assert torch.equal(got, want) and info["sha256"] == want_info["sha256"]


def test_a_directory_mixing_files_and_a_dataset_is_read_in_sorted_order(root, docs):
    datasets = pytest.importorskip("datasets")
    d = root / "mixed"
    d.mkdir()
    (d / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:3]))
    pq.write_table(pa.table({"text": [None, "", docs[3]]}), d / "b.parquet")  # null and empty rows: skipped
    datasets.Dataset.from_dict({"text": docs[4:6]}).save_to_disk(str(d / "c"))
    (d / "c" / "notes.txt").write_text("not part of the dataset")  # inside a datasets directory: ignored
    (d / "d.txt").write_text(docs[6])
    data_mod.check_data(d)
    texts = [t for _, t in iter_documents(d) if t.strip()]
    assert texts == docs[:7]
    assert [s for s, _ in iter_documents(d)][3:6] == ["b.parquet:1", "b.parquet:2", "b.parquet:3"]


def test_calibrate_on_parquet_and_datasets_directories_equals_jsonl(teacher, corpus, sources, tmp_path):
    shas = {}
    for kind, data in [("jsonl", corpus), *sources.items()]:
        out = tmp_path / kind
        result = run("calibrate", teacher, "--data", data, "--out", out, "--tokens", "512", "--seq-len", "32",
                     "--no-progress")
        assert result.exit_code == 0, result.output
        assert "longer than the specified maximum" not in result.output
        shas[kind] = json.loads((out / "manifest.json").read_text())["inputs"]["tokens_sha256"]
    assert len(set(shas.values())) == 1, shas
    reference, _ = _reference_token_sequences(AutoTokenizer.from_pretrained(teacher), corpus, 512, 32)
    assert shas["jsonl"] == hashlib.sha256(reference.numpy().tobytes()).hexdigest()


def test_distill_on_parquet_data(teacher, student, corpus, sources, tmp_path):
    out = tmp_path / "distilled"
    result = run("distill", "--teacher", teacher, "--student", student, "--data", sources["parquet-dir"],
                 "--tokens", "256", "--seq-len", "32", "--batch-size", "4", "--lr", "3e-3", "--out", out,
                 "--no-progress")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    _, want = _reference_pack_tokens(AutoTokenizer.from_pretrained(teacher), corpus, 8, 32)
    assert manifest["inputs"]["tokens_sha256"] == want["sha256"]
    assert manifest["summary"]["steps"] == 2 and manifest["summary"]["documents"] == want["documents"] == 64
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


# --- tables refused in one line ----------------------------------------------------------------------------------

def test_a_parquet_file_without_a_text_column_is_refused_in_one_line(teacher, tmp_path):
    bad = tmp_path / "no-text.parquet"
    pq.write_table(pa.table({"id": [1, 2], "content": ["a", "b"]}), bad)
    out = tmp_path / "stats"
    assert_one_line_error(run("calibrate", teacher, "--data", bad, "--out", out, "--tokens", "512", "--seq-len", "32",
                              "--no-progress"),
                          str(bad), "no 'text' column", "(its columns: id, content)", "rename the column")
    assert not out.exists()


@pytest.mark.parametrize("case", ["int-text", "binary-text", "invalid-utf8", "not-parquet", "no-train-split",
                                  "later-file"])
def test_bad_tables_are_refused_before_any_model_is_loaded(case, sources, tmp_path):
    path = tmp_path / f"{case}.parquet"
    if case == "int-text":
        pq.write_table(pa.table({"text": [1, 2]}), path)
        phrases = ["'text' column", "holds int64, not strings"]
    elif case == "binary-text":
        pq.write_table(pa.table({"text": pa.array([b"\x00\x01", b"x"], pa.binary())}), path)
        phrases = ["holds binary, not strings"]
    elif case == "invalid-utf8":
        pq.write_table(pa.table({"text": pa.array([b"ok", b"\xff\xfe\x00bad"], pa.binary()).view(pa.string())}), path)
        phrases = ["is not UTF-8 text", "invalid UTF-8"]
    elif case == "not-parquet":
        path.write_bytes(b"PAR1 this is no parquet file")
        phrases = ["cannot read data file", "as parquet"]
    elif case == "no-train-split":
        datasets = pytest.importorskip("datasets")
        path = tmp_path / "dd"
        datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": ["a"]}),
                              "test": datasets.Dataset.from_dict({"text": ["b"]})}).save_to_disk(str(path))
        phrases = ["has no 'train' split", "its splits: validation, test", "pass one split's directory"]
    else:  # the second of two files lacks the column: its schema is checked upfront too
        path = tmp_path / "dir"
        path.mkdir()
        pq.write_table(pa.table({"text": ["fine"]}), path / "0.parquet")
        pq.write_table(pa.table({"body": ["no"]}), path / "1.parquet")
        phrases = [str(path / "1.parquet"), "no 'text' column", "(its columns: body)"]
    with pytest.raises(EdgeconvError) as err:
        data_mod.check_data(path)
    for phrase in phrases:
        assert phrase in err.value.line(), (phrase, err.value.line())
    assert "\n" not in err.value.line()


def test_the_importance_matrix_reads_parquet_as_it_reads_jsonl(student, corpus, sources):
    pytest.importorskip("gguf")
    from edgeconv.export.gguf.imatrix import compute_imatrix

    want = compute_imatrix(student, corpus, tokens=256, seq_len=32)
    got = compute_imatrix(student, sources["parquet"], tokens=256, seq_len=32)
    assert want.keys() == got.keys() and len(want) >= 7 * 2
    assert all(torch.equal(got[name], want[name]) for name in want)
