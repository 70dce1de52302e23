"""Read a user's own dataset (JSONL / JSON / CSV / Parquet file or a ``save_to_disk`` directory).

Files are read with ``datasets.load_dataset(<format>, data_files=...)`` and directories with
``datasets.load_from_disk``; both work offline. No code from the data is ever executed and
nothing is unpickled (``datasets`` stores Arrow).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fedsecure.data.base import DataError, DataFileNotFoundError

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def read_rows(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (dicts) and column names of a local dataset.

    Raises
    ------
    DataFileNotFoundError
        If ``path`` does not exist.
    DataError
        For an unsupported file type or a ``DatasetDict`` without a usable split.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataFileNotFoundError(
            f"path: {str(p)!r} does not exist; pass a .jsonl/.json/.csv/.parquet file or a directory "
            "written by datasets' save_to_disk"
        )
    import datasets
    import datasets.exceptions

    if p.is_dir():
        try:
            ds = datasets.load_from_disk(str(p))
        except FileNotFoundError as err:
            raise DataError(
                f"path: directory {str(p)!r} is not a datasets save_to_disk directory ({err}); "
                "pass a file or a directory written by Dataset.save_to_disk"
            ) from err
        if isinstance(ds, datasets.DatasetDict):
            splits = list(ds)
            if "train" in ds:
                ds = ds["train"]
            elif len(splits) == 1:
                ds = ds[splits[0]]
            else:
                raise DataError(
                    f"path: {str(p)!r} holds splits {splits} and none is 'train'; save the split to use "
                    "on its own (ds['name'].save_to_disk(...))"
                )
    else:
        fmt = FILE_FORMATS.get(p.suffix.lower())
        if fmt is None:
            raise DataError(
                f"path: unsupported file type {p.suffix!r} for {str(p)!r}; use one of {', '.join(FILE_FORMATS)} "
                "or a save_to_disk directory"
            )
        try:
            ds = datasets.load_dataset(fmt, data_files=str(p), split="train")
        except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as err:  # malformed file
            raise DataError(f"path: could not read {str(p)!r} as {fmt}: {err.__cause__ or err}") from err
    columns = list(ds.column_names)
    return [dict(row) for row in ds], columns
