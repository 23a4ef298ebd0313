"""A sweep's dataset on disk: an append-only Parquet store, one part file per finished chunk
(written atomically: temporary name, then rename), read back one row per key.

Apart from the sweep itself (:mod:`twin.ml.sweep`, which re-exports :func:`read_sweep`,
:class:`SweepStore` and :func:`comparable`) because reading a dataset needs none of the
twin: training and the tests read stores written elsewhere.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Sequence

import pandas as pd

from twin.outputs import MARKER, write_marker

#: Columns that change from run to run of the same point (excluded from equality checks).
VOLATILE_COLUMNS = ("wall_s", "worker")


class SweepStore:
    """An append-only Parquet dataset: ``<dir>/parts/part-*.parquet``, one per chunk.

    A part that cannot be read whole (truncated or 0 bytes: a full disk, a node that died)
    is quarantined -- renamed to ``<part>.corrupt`` and reported once on stderr -- so that
    its keys count as not done (a resumed sweep redoes them) and every other part is still
    read. Temporary parts left by a killed writer are removed when a sweep starts.
    """

    QUARANTINE_SUFFIX = ".corrupt"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.parts = self.path / "parts"

    def part_files(self) -> list[Path]:
        if not self.parts.is_dir():
            return []
        return sorted(p for p in self.parts.glob("part-*.parquet"))

    def quarantined(self) -> list[Path]:
        if not self.parts.is_dir():
            return []
        return sorted(self.parts.glob(f"part-*.parquet{self.QUARANTINE_SUFFIX}"))

    def _tables(self, columns=None) -> list:
        """The readable parts (pyarrow tables); unreadable ones are quarantined."""
        import pyarrow.parquet as pq  # lazy: pyarrow's import is slow; only stores need it

        out = []
        for p in self.part_files():
            try:
                table = pq.read_table(p)   # whole: a damaged page fails here, not later
                if "key" not in table.column_names:
                    raise ValueError("no 'key' column")
            except FileNotFoundError:
                continue   # quarantined meanwhile by another reader
            except Exception as exc:  # noqa: BLE001 -- any unreadable part is set aside
                self._quarantine(p, exc)
                continue
            out.append(table.select(columns) if columns else table)
        return out

    def _quarantine(self, part: Path, exc: BaseException) -> None:
        dest = part.with_name(part.name + self.QUARANTINE_SUFFIX)
        why = " ".join(str(exc).split())[:200] or type(exc).__name__
        try:
            os.replace(part, dest)
            where = f"moved aside to {dest.name}"
        except OSError as err:   # read-only store: skip it, report it
            where = f"skipped (could not move it aside: {err.strerror})"
        print(f"twin: sweep part {part} is unreadable ({why}); {where}; its points count as "
              "not done and a resumed sweep redoes them", file=sys.stderr)

    def done_keys(self) -> set[str]:
        keys: set[str] = set()
        for t in self._tables(["key"]):
            keys.update(t.column("key").to_pylist())
        return keys

    def clean_temp(self) -> list[Path]:
        """Remove temporary parts whose writer is gone (a killed sweep); returns them."""
        removed = []
        if not self.parts.is_dir():
            return removed
        for p in self.parts.glob(".tmp-*"):
            pid = p.name.split("-")[1] if p.name.count("-") >= 2 else ""
            if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                continue   # another sweep on this host is still writing it
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
        return removed

    def write_part(self, rows: Sequence[dict]) -> Path | None:
        if not rows:
            return None
        self.parts.mkdir(parents=True, exist_ok=True)
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.parts / f".tmp-{os.getpid()}-{name}"
        pd.DataFrame(list(rows)).to_parquet(tmp, index=False)
        os.replace(tmp, self.parts / name)
        return self.parts / name

    def read(self) -> pd.DataFrame:
        tables = self._tables()
        if not tables:
            return pd.DataFrame()
        df = pd.concat([t.to_pandas() for t in tables], ignore_index=True)
        return df.drop_duplicates("key", keep="first").sort_values("key").reset_index(drop=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True   # exists, not ours
    return True


def read_sweep(path: str | Path) -> pd.DataFrame:
    """All rows of a sweep dataset (one per key, sorted by key)."""
    return SweepStore(path).read()


def adopt_store(path: str | Path) -> None:
    """Mark a sweep store written before twin's output marker existed (it has a
    ``sweep.json`` with twin's version) as twin's, so it keeps resuming."""
    p = Path(path)
    if p.is_dir() and not (p / MARKER).exists() and (p / "sweep.json").is_file():
        try:
            ours = "twin_version" in json.loads((p / "sweep.json").read_text())
        except (OSError, ValueError):
            ours = False
        if ours:
            write_marker(p, "sweep")


def comparable(df: pd.DataFrame) -> pd.DataFrame:
    """Rows without the columns that differ between runs of the same points."""
    return (df.drop(columns=[c for c in VOLATILE_COLUMNS if c in df.columns])
              .sort_values("key").reset_index(drop=True))
