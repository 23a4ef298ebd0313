"""Adapter catalog: adapter id → rank (and optionally a PEFT directory and its bytes).

The twin needs an adapter's rank for its bytes (load time) and to refuse ranks above
``max_lora_rank`` as vLLM does. Without a catalog every adapter of the trace gets
``default_rank``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from twin.errors import TwinInputError


class AdapterCatalog:
    def __init__(self, table: pd.DataFrame, source: str = "catalog"):
        if "adapter" not in table.columns or "rank" not in table.columns:
            raise TwinInputError("a catalog needs columns 'adapter' and 'rank'", file=source,
                                 field="adapter" if "adapter" not in table.columns else "rank")
        table = table.reset_index(drop=True).copy()
        table["adapter"] = table["adapter"].astype("string")
        rank = pd.to_numeric(table["rank"], errors="coerce")
        for row in range(len(table)):
            if pd.isna(table["adapter"].iloc[row]):
                raise TwinInputError("adapter id is empty", file=source, row=row, field="adapter")
            r = rank.iloc[row]
            if pd.isna(r) or r < 1 or r != int(r):
                raise TwinInputError(f"expected a positive integer rank, got {table['rank'].iloc[row]!r}",
                                     file=source, row=row, field="rank")
        dup = table["adapter"].duplicated()
        if dup.any():
            row = int(dup.to_numpy().nonzero()[0][0])
            raise TwinInputError(f"adapter {table['adapter'].iloc[row]!r} listed twice",
                                 file=source, row=row, field="adapter")
        table["rank"] = rank.astype(int)
        self.table = table
        self.source = source
        self._rank = dict(zip(table["adapter"], table["rank"]))

    @classmethod
    def read(cls, path: str | Path) -> "AdapterCatalog":
        path = Path(path)
        if not path.exists():
            raise TwinInputError("catalog file not found", file=str(path))
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        return cls(df, source=str(path))

    @classmethod
    def uniform(cls, adapters, rank: int) -> "AdapterCatalog":
        return cls(pd.DataFrame({"adapter": list(adapters), "rank": rank}), source="default")

    @property
    def adapters(self) -> list[str]:
        return list(self.table["adapter"])

    def rank(self, adapter: str) -> int:
        return self._rank[adapter]

    def __contains__(self, adapter: str) -> bool:
        return adapter in self._rank

    def __len__(self) -> int:
        return len(self.table)

    def check(self, trace: pd.DataFrame, max_lora_rank: int, trace_source: str = "trace") -> None:
        """Refuse traces naming unknown adapters and adapters vLLM would refuse to load."""
        names = trace["adapter"].dropna().unique()
        unknown = [a for a in names if a not in self._rank]
        if unknown:
            row = int((trace["adapter"] == unknown[0]).fillna(False).to_numpy(bool).nonzero()[0][0])
            raise TwinInputError(f"unknown adapter {unknown[0]!r} (not in {self.source}; "
                                 f"{len(unknown)} unknown in all)", file=trace_source, row=row,
                                 field="adapter")
        too_big = self.table[self.table["rank"] > max_lora_rank]
        if len(too_big):
            row = int(too_big.index[0])
            raise TwinInputError(
                f"adapter {too_big['adapter'].iloc[0]!r} has rank {int(too_big['rank'].iloc[0])} "
                f"> max_lora_rank {max_lora_rank}; raise max_lora_rank or drop the adapter",
                file=self.source, row=row, field="rank")
