"""Adapter load time: disk → host (read + pack) and host → GPU slot (zero + copy).

Both are affine in the adapter's bytes; vLLM performs them synchronously inside the step
that first needs the adapter, so they add to that step's duration.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoadTimeModel:
    disk_s: float               # fixed cost per disk load (open, parse config, pin)
    disk_s_per_byte: float
    host_to_gpu_s: float        # fixed cost per activation (slot zeroing, launches)
    host_to_gpu_s_per_byte: float

    def disk(self, nbytes: float) -> float:
        return self.disk_s + self.disk_s_per_byte * nbytes

    def host_to_gpu(self, nbytes: float) -> float:
        return self.host_to_gpu_s + self.host_to_gpu_s_per_byte * nbytes

    def load(self, nbytes: float, from_disk: bool) -> float:
        t = self.host_to_gpu(nbytes)
        return t + self.disk(nbytes) if from_disk else t

    def to_dict(self) -> dict:
        return dict(self.__dict__)
