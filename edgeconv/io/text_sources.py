"""Documents from tables: parquet files and `datasets` `save_to_disk` directories, read as a stream.

A table holds one document per row, in a string column named `text` (other columns are ignored). It is read
batch by batch (a parquet file row group by row group, an arrow file record batch by record batch), so a table
larger than RAM costs one row group or batch of its `text` column at a time. A null or blank `text` is an empty
document (skipped, as a blank JSONL line is).

A `datasets` directory is what `Dataset.save_to_disk` writes: `state.json` (listing its arrow files in order),
`dataset_info.json` and `data-XXXXX-of-NNNNN.arrow` (arrow IPC streams). A `DatasetDict`'s directory
(`dataset_dict.json`, one such directory per split) is read through its `train` split. No `datasets` import is
needed: the files are read with pyarrow.

Arrow checks that the strings are UTF-8 only when asked, so every batch is validated as it is read: invalid
UTF-8 (binary data stored as strings) is refused, as the text guard refuses binary text files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from edgeconv.errors import EdgeconvError

PARQUET_SUFFIXES = {".parquet", ".pq"}
ARROW_SUFFIXES = {".arrow"}
TEXT_COLUMN = "text"
BATCH_ROWS = 1024  # rows per batch read from a table: bounded memory whatever the file's size
DATASET_STATE = "state.json"
DATASET_INFO = "dataset_info.json"
DATASET_DICT = "dataset_dict.json"
_HINT = "pass a table with a string column 'text' holding one document per row"


def is_table(file: Path) -> bool:
    return file.suffix.lower() in PARQUET_SUFFIXES | ARROW_SUFFIXES


def is_datasets_dir(path: Path) -> bool:
    """A directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    path = Path(path)
    return path.is_dir() and ((path / DATASET_STATE).is_file() or (path / DATASET_DICT).is_file())


def datasets_files(path: Path) -> list[Path]:
    """The arrow files of a `save_to_disk` directory, in the dataset's row order (a DatasetDict: its train
    split)."""
    path = Path(path)
    if (path / DATASET_DICT).is_file():
        try:
            splits = list(json.loads((path / DATASET_DICT).read_text())["splits"])
        except (OSError, ValueError, KeyError, TypeError):
            raise EdgeconvError(f"{path / DATASET_DICT} is not a readable DatasetDict description",
                                "pass the directory DatasetDict.save_to_disk wrote, or one split's directory")
        if "train" not in splits:
            raise EdgeconvError(
                f"the DatasetDict {path} has no 'train' split (its splits: {', '.join(map(str, splits)) or 'none'})",
                f"pass one split's directory, e.g. {path / str(splits[0])}" if splits else _HINT,
            )
        return datasets_files(path / "train")
    try:
        state = json.loads((path / DATASET_STATE).read_text())
        names = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise EdgeconvError(f"{path / DATASET_STATE} does not list the dataset's arrow files",
                            "pass a directory written by datasets' save_to_disk")
    files = [path / name for name in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise EdgeconvError(f"the dataset {path} misses its file {missing[0]} (listed in {DATASET_STATE})",
                            "save the dataset again with save_to_disk")
    if not files:
        raise EdgeconvError(f"the dataset {path} has no data files", _HINT)
    return files


def _text_field_type(file: Path, schema) -> None:
    import pyarrow as pa

    if TEXT_COLUMN not in schema.names:
        raise EdgeconvError(
            f"data file {file} has no '{TEXT_COLUMN}' column (its columns: {', '.join(schema.names) or 'none'})",
            f"rename the column holding the documents to '{TEXT_COLUMN}'",
        )
    kind = schema.field(TEXT_COLUMN).type
    is_view = getattr(pa.types, "is_string_view", lambda t: False)  # pyarrow >= 16
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_view(kind)):
        raise EdgeconvError(f"the '{TEXT_COLUMN}' column of data file {file} holds {kind}, not strings", _HINT)


def _batches(file: Path, rows: int) -> Iterator:
    """The `text` column of `file`, `rows` rows at a time (after checking it is there and holds strings)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if file.suffix.lower() in PARQUET_SUFFIXES:
            with pq.ParquetFile(file) as pf:
                _text_field_type(file, pf.schema_arrow)
                # One row group at a time: iter_batches over the whole file reads ahead (it held a 54 MB
                # file's whole text column at once), over one row group it holds that row group's.
                for group in range(pf.metadata.num_row_groups):
                    for batch in pf.iter_batches(batch_size=rows, row_groups=[group], columns=[TEXT_COLUMN],
                                                 use_threads=False):
                        yield batch.column(0)
        else:
            with pa.OSFile(str(file)) as source:  # read, not mapped: a batch in memory at a time
                try:
                    reader = pa.ipc.open_stream(source)  # what datasets writes
                except pa.ArrowInvalid:
                    source.seek(0)
                    reader = pa.ipc.open_file(source)
                _text_field_type(file, reader.schema)
                column = reader.schema.get_field_index(TEXT_COLUMN)
                if isinstance(reader, pa.ipc.RecordBatchFileReader):
                    batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
                else:
                    batches = iter(reader)
                for batch in batches:
                    text = batch.column(column)
                    for start in range(0, len(text), rows):
                        yield text.slice(start, rows)
    except EdgeconvError:
        raise
    except (OSError, pa.ArrowException) as exc:  # a truncated or foreign file
        raise EdgeconvError(f"cannot read data file {file} as {_kind(file)}: {' '.join(str(exc).split())[:200]}",
                            "check the file (a partial download?)")


def _kind(file: Path) -> str:
    return "parquet" if file.suffix.lower() in PARQUET_SUFFIXES else "an arrow file"


def _validated(file: Path, column, first_row: int):
    import pyarrow as pa

    try:
        column.validate(full=True)
    except pa.ArrowInvalid as exc:
        raise EdgeconvError(
            f"data file {file} is not UTF-8 text: the '{TEXT_COLUMN}' column of the rows from {first_row:,} on "
            f"holds invalid UTF-8 ({' '.join(str(exc).split())[:120]}; binary data?)", _HINT)
    return column


def iter_table_documents(file: Path) -> Iterator[tuple[str, str]]:
    """(source, text) for every row of a parquet or arrow file; source is `NAME:ROW` (rows from 1)."""
    row = 0
    for column in _batches(file, BATCH_ROWS):
        for text in _validated(file, column, row + 1).to_pylist():
            row += 1
            yield f"{file.name}:{row}", text or ""


def check_table(file: Path, rows: int = 64) -> None:
    """Cheap upfront check: the schema has a string `text` column, and the first rows are UTF-8."""
    for column in _batches(file, rows):
        _validated(file, column, 1)
        break


def check_schema(file: Path) -> None:
    """The cheapest check: the file's schema (a parquet footer, an arrow stream's first message) has a string
    `text` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if file.suffix.lower() in PARQUET_SUFFIXES:
            schema = pq.read_schema(file)
        else:
            with pa.OSFile(str(file)) as source:
                try:
                    schema = pa.ipc.open_stream(source).schema
                except pa.ArrowInvalid:
                    source.seek(0)
                    schema = pa.ipc.open_file(source).schema
    except (OSError, pa.ArrowException) as exc:
        raise EdgeconvError(f"cannot read data file {file} as {_kind(file)}: {' '.join(str(exc).split())[:200]}",
                            "check the file (a partial download?)")
    _text_field_type(file, schema)
