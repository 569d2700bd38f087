"""Rows from wherever people keep a dataset, independent of what the rows mean.

    read_source(source, split="train", config=None) -> iterator of (where, record | DataIssue)

`source` may be
  - a local file: .jsonl (where = "file:line"), .json (an array, or {"train": [...]}), .parquet, .csv
    (where = "file: row N"); .jsonl, .json and .csv are read row by row in bounded memory
    (align/data/readers.py: a line too long or nested too deep is a bad row, a ragged CSV row names its line);
  - a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (a dict gives `split`);
  - a folder of data files, as a cloned hub dataset repository is (train.jsonl + test.jsonl,
    data/train-00000-of-00001.parquet, a README.md naming configs): read as
    `datasets.load_dataset(folder, config, split=split)` reads it (where = "FOLDER: row N", or
    "FOLDER[SPLIT]: row N" for another split; N counts rows across the split's files);
  - a hub id ("org/name" or "name") for `datasets.load_dataset(source, config, split=split)`, which
    reads the local `datasets` cache when offline;
  - in Python, a `datasets.Dataset` / `DatasetDict` or a list of dicts (where = "LABEL: row N").

A path that does not exist is "file not found" when it looks like one (a known suffix, "./", "/",
more than one "/"); anything else shaped like a hub id goes to `datasets`. Preference and SFT
recipes both read through here, so every recipe accepts the same sources with the same messages.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from align.data.issues import DataError, DataIssue
from align.data.readers import read_csv, read_json, read_jsonl

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
# "name" or "org/name", as the hub spells dataset ids.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?")


def describe(source) -> str:
    """A short name for a source in messages."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, list):
        return f"a list of {len(source)} rows"
    return type(source).__name__


# -- local files ----------------------------------------------------------------------------------
def _csv_options(path: Path) -> dict:
    """Every CSV column read as text: pandas would turn an answer "70" into the number 70, "" into NaN."""
    import csv

    import datasets

    with path.open(newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    return {"features": datasets.Features({name: datasets.Value("string") for name in header}),
            "keep_default_na": False}


def _read_parquet(path: Path):
    import datasets

    try:
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as e:  # pyarrow and pandas raise many types; the message is what matters
        raise DataError([DataIssue(str(path), None, f"could not read it as parquet: {_first_line(e)}")]) from None
    yield from _read_rows(ds, str(path))


def _read_file(path: Path):
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from read_jsonl(path)
    elif suffix == ".json":
        yield from read_json(path)
    elif suffix == ".csv":
        yield from read_csv(path)
    elif suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        raise DataError([DataIssue(str(path), None, f"unknown file type {suffix!r}; expected "
                                                    f"{', '.join(FILE_SUFFIXES)}, a save_to_disk folder or a "
                                                    f"dataset name")])


# -- datasets objects ------------------------------------------------------------------------------
def _pick_split(ds, split: str, label: str):
    """The `split` of a DatasetDict (a Dataset is its own split)."""
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError([DataIssue(label, None, f"no split {split!r}; expected one of {sorted(ds)}")])
        return ds[split]
    return ds


def _read_rows(rows, label: str):
    for i, record in enumerate(rows):
        yield f"{label}: row {i}", record


def _data_files(path: Path) -> list[Path]:
    """The data files under `path`, hidden ones (.git, __pycache__) left out as `datasets` leaves them out."""
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
        found += [Path(root, f) for f in files if Path(f).suffix.lower() in FILE_SUFFIXES and not f.startswith(".")]
    return sorted(found)


def _read_data_folder(path: Path, split: str, config: str | None):
    """A folder of data files as `datasets.load_dataset(folder)` reads it (its split-name conventions, README configs)."""
    import datasets

    files = _data_files(path)
    if not files:
        raise DataError([DataIssue(str(path), None, "a folder, but neither written by save_to_disk (no state.json "
                                                    "or dataset_dict.json) nor holding data files "
                                                    f"({', '.join(FILE_SUFFIXES)}); expected a data file, a folder "
                                                    "of them, a save_to_disk folder or a dataset name")])
    # CSV cells stay text, as for a single .csv file (pandas would turn "70" into 70 and "" into NaN).
    options = _csv_options(files[0]) if all(f.suffix.lower() == ".csv" for f in files) else {}
    try:
        ds = datasets.load_dataset(str(path), config, split=split, **options)
    except Exception as e:  # unknown split or config, unreadable file, mismatched columns: the message says which
        raise DataError([DataIssue(str(path), None, f"could not load the folder of data files: {_first_line(e)}")]
                        ) from None
    yield from _read_rows(ds, str(path) if split == "train" else f"{path}[{split}]")


def _read_folder(path: Path, split: str, config: str | None = None):
    import datasets

    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        yield from _read_data_folder(path, split, config)
        return
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError([DataIssue(str(path), None, f"could not load the save_to_disk folder: {_first_line(e)}")]
                        ) from None
    yield from _read_rows(_pick_split(ds, split, str(path)), str(path))


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def offline() -> bool:
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE) or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in (
        "1", "ON", "YES", "TRUE")


def load_hub(name: str, split: str = "train", config: str | None = None):
    """`datasets.load_dataset(name, config, split=split)`, its failures as one line naming the dataset."""
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split)
    except ConnectionError:
        cache = os.environ.get("HF_DATASETS_CACHE") or datasets.config.HF_DATASETS_CACHE
        why = "offline mode is on" if offline() else "the hub cannot be reached"
        raise DataError([DataIssue(name, None, f"dataset not in the local datasets cache ({cache}) and {why}; load "
                                               f"it once online, or give a local file or a save_to_disk folder")]
                        ) from None
    except Exception as e:  # datasets raises many types (unknown split or config, missing repo, ...)
        raise DataError([DataIssue(name, None, f"could not load dataset: {_first_line(e)}")]) from None


def looks_like_path(source: str) -> bool:
    return (Path(source).suffix.lower() in FILE_SUFFIXES or source.startswith((".", "/", "~")) or os.sep in source
            and not _HUB_ID.fullmatch(source))


# -- the one entry point ---------------------------------------------------------------------------
def read_source(source, split: str = "train", config: str | None = None, label: str | None = None):
    """Yield (where, record | DataIssue) for every row of `source` (see the module docstring)."""
    if isinstance(source, list):
        yield from _read_rows(source, label or "rows")
        return
    if not isinstance(source, (str, os.PathLike)):
        import datasets

        if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
            name = label or "dataset"
            yield from _read_rows(_pick_split(source, split, name), name)
            return
        raise DataError([DataIssue(describe(source), None, "expected a file, a folder, a dataset name, a "
                                                            "datasets.Dataset or a list of dicts")])
    text = str(source)
    path = Path(text).expanduser()
    if not text.strip():
        raise DataError([DataIssue("data", None, "no source given; expected a file, a folder or a dataset name")])
    if path.is_file():
        yield from _read_file(path)
    elif path.is_dir():
        yield from _read_folder(path, split, config)
    elif _HUB_ID.fullmatch(text) and ".." not in text and Path(text).suffix.lower() not in FILE_SUFFIXES:
        name = text if split == "train" else f"{text}[{split}]"
        yield from _read_rows(load_hub(text, split, config), label or name)
    elif looks_like_path(text):
        raise DataError([DataIssue(text, None, "file not found")])
    else:
        raise DataError([DataIssue(text, None, "neither an existing file or folder nor a dataset name ('org/name')")])


def read_all(source, split: str = "train", config: str | None = None, label: str | None = None
             ) -> list[tuple[str, object]]:
    """`read_source` as a list, raising one DataError that lists every unreadable row."""
    out = list(read_source(source, split, config, label))
    bad = [r for _, r in out if isinstance(r, DataIssue)]
    if bad:
        raise DataError(bad)
    return out
