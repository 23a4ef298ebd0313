"""Adapter catalog: adapter id → rank (and optionally a PEFT directory and its bytes).

The twin needs an adapter's rank for its bytes (load time) and to refuse ranks above
``max_lora_rank`` as vLLM does. Without a catalog every adapter of the trace gets
``default_rank``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from twin.errors import TwinInputError
from twin.workload.schema import read_table
from twin.workload.values import INT32_MAX, exact_ints, exact_strings

#: The largest rank a catalog may list (int32); vLLM then refuses ranks above max_lora_rank.
MAX_RANK = INT32_MAX
#: PEFT's ``peft_type`` names, the values of a catalog's optional ``kind`` column (split
#: execution serves them side by side; vLLM serves LoRA only). Without the column every
#: adapter is LoRA. Only LoRA has a rank: the other kinds list rank 0.
LORA, IA3, PREFIX_TUNING, PROMPT_TUNING = "LORA", "IA3", "PREFIX_TUNING", "PROMPT_TUNING"
PEFT_KINDS: tuple[str, ...] = (LORA, IA3, PREFIX_TUNING, PROMPT_TUNING)


def _check_kinds(kinds, rank, source: str) -> None:
    """Known ``kinds`` (PEFT's names); rank >= 1 for every LoRA adapter."""
    for row, (k, r) in enumerate(zip(kinds, rank)):
        if k not in PEFT_KINDS:
            raise TwinInputError(f"unknown adapter kind {k!r}; expected one of {PEFT_KINDS}",
                                 file=source, row=row, field="kind")
        if k == LORA and r < 1:
            raise TwinInputError(f"a LoRA adapter needs rank >= 1, got {r}",
                                 file=source, row=row, field="rank")


class AdapterCatalog:
    def __init__(self, table: pd.DataFrame, source: str = "catalog"):
        if "adapter" not in table.columns or "rank" not in table.columns:
            raise TwinInputError("a catalog needs columns 'adapter' and 'rank'", file=source,
                                 field="adapter" if "adapter" not in table.columns else "rank")
        table = table.reset_index(drop=True).copy()
        table["adapter"] = exact_strings(table["adapter"], source, "adapter")
        for row, a in enumerate(table["adapter"]):
            if pd.isna(a) or not str(a).strip():
                raise TwinInputError("adapter id is empty", file=source, row=row, field="adapter")
        rank = exact_ints(table["rank"], source, "rank", 0, MAX_RANK)
        if "kind" in table.columns:     # PEFT writes its names in capitals; accept any case
            table["kind"] = [k.upper() if isinstance(k, str) else k for k in table["kind"]]
        _check_kinds(table["kind"] if "kind" in table.columns else [LORA] * len(table), rank,
                     source)
        dup = table["adapter"].duplicated()
        if dup.any():
            row = int(dup.to_numpy().nonzero()[0][0])
            raise TwinInputError(f"adapter {table['adapter'].iloc[row]!r} listed twice",
                                 file=source, row=row, field="adapter")
        table["rank"] = rank
        self.table = table
        self.source = source
        self._rank = dict(zip(table["adapter"], table["rank"]))
        self._kind = dict(zip(table["adapter"], table["kind"])) if "kind" in table else {}

    @classmethod
    def read(cls, path: str | Path) -> "AdapterCatalog":
        path = Path(path)
        df = read_table(path, "catalog", str_columns=("adapter", "rank"))
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

    def kind(self, adapter: str) -> str:
        return self._kind.get(adapter, LORA)

    def check(self, trace: pd.DataFrame, max_lora_rank: int, trace_source: str = "trace", *,
              lora_only: bool = True, kinds: tuple[str, ...] | None = None,
              note: str = "vLLM serves LoRA adapters only") -> None:
        """Refuse traces naming unknown adapters and adapters vLLM would refuse to load
        (``lora_only``: vLLM serves LoRA only; a split client serves every PEFT kind; or
        ``kinds``: the PEFT kinds the server serves, ``note`` saying why only those)."""
        kinds = kinds if kinds is not None else (LORA,) if lora_only else PEFT_KINDS
        names = trace["adapter"].dropna().unique()
        unknown = [a for a in names if a not in self._rank]
        if unknown:
            row = int((trace["adapter"] == unknown[0]).fillna(False).to_numpy(bool).nonzero()[0][0])
            raise TwinInputError(f"unknown adapter {unknown[0]!r} (not in {self.source}; "
                                 f"{len(unknown)} unknown in all)", file=trace_source, row=row,
                                 field="adapter")
        other = [a for a in names if self.kind(a) not in kinds]
        if other:
            row = int(self.table.index[self.table["adapter"] == other[0]][0])
            raise TwinInputError(
                f"adapter {other[0]!r} is {self.kind(other[0])}: {note}; serve other PEFT "
                "kinds with the split strategy", file=self.source, row=row, field="kind")
        too_big = self.table[self.table["rank"] > max_lora_rank]
        if len(too_big):
            row = int(too_big.index[0])
            raise TwinInputError(
                f"adapter {too_big['adapter'].iloc[0]!r} has rank {int(too_big['rank'].iloc[0])} "
                f"> max_lora_rank {max_lora_rank}; raise max_lora_rank or drop the adapter",
                file=self.source, row=row, field="rank")
