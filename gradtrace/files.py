"""Output files written whole or not at all: a kill mid-write must not leave a cut table that a reader, or a later
stage judging freshness (the report), takes for the whole."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


def disk_full(err: BaseException) -> bool:
    """Whether `err` says the disk is full, or the user's quota on it used up."""
    return getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT)


def full_disk_words(err: BaseException, written: str | Path | None) -> str:
    """A full disk's error in words: the disk holding `written` (where the command wrote: zarr's and the tables'
    errors name no file), or the folder of the file the error names where that lies elsewhere (a temporary file)."""
    where, failed = written, getattr(err, "filename", None)
    if not isinstance(failed, (str, os.PathLike)):  # none, or a file descriptor
        failed = None
    if failed is not None and (written is None or not Path(failed).absolute().is_relative_to(Path(written).absolute())):
        where = Path(failed).parent
    return f"the disk{f' holding {where}' if where else ''} is full (or your quota on it is used up)"


@contextlib.contextmanager
def written_whole(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix: writers that read the format from it keep working) for the block
    to write; renamed onto `path` when the block ends, removed when it raises."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except PermissionError as err:
        if os.access(path.parent, os.W_OK):
            raise
        raise PermissionError(f"cannot write {path}: {path.parent} is not writable (read-only storage, or another "
                              "user's); write it into a directory of your own (the analyses' out=DIR, the command "
                              "line's --out DIR)") from err
    finally:
        with contextlib.suppress(OSError):  # already renamed, or never made (a directory that is a file, say)
            tmp.unlink(missing_ok=True)


def write_csv(table: pd.DataFrame, path: str | Path) -> None:
    """`table` as CSV at `path`, without its index, written whole or not at all."""
    with written_whole(path) as tmp:
        table.to_csv(tmp, index=False)


def write_json(data: object, path: str | Path, indent: int = 2) -> None:
    """`data` as indented JSON (UTF-8) at `path`, written whole or not at all."""
    with written_whole(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent), encoding="utf-8")


def sha256_of(path: str | Path) -> str:
    """The sha256 of a file's bytes, in hex (read a block at a time: a weights file need not fit in memory)."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


# The key under which stats.json and predict.json record the sha256 of the results.csv their tables were computed
# from: the report recomputes tables computed from another (modification times alone let a copy made without -p, as
# `cp -r` and `scp -r` make, pass stale tables as fresh).
RESULTS_DIGEST = "results_sha256"
