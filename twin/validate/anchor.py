"""The speed anchor in ``twin validate``: price the twin at the box's speed during the run.

A CPU profile is calibrated minutes (or days) before it is validated, and a shared box is
not equally fast at both times (issue 15: +-10% drift over seconds, a ~1.8x slower state
for minutes). The profile's provenance holds ``speed_anchor_s``, the anchor benchmark's
median during calibration (``twin.executor.speed_anchor``); validation measures the same
benchmark, on the same model, before and after every executor run. The twin compared is
then the profile with every step-time weight multiplied by

    ratio = median(anchor samples during validation) / speed_anchor_s

(``twin.policies.deployment.scaled_profile``, the same seam time-slicing uses): one
scalar per validation, measured on the benchmark, never fitted on the validated run's own
steps. Adapter load times are not scaled (disk and copy, not the forward's hot path).

It corrects a slow drift of the whole box between calibration and validation; it does not
correct noise within a run (lost time slices, a speed flip in the middle of a trace).
Opt-in (``twin validate --speed-anchor``), off by default on every device: on the shared
2-core box it was built on, its correction was as large as its own noise, helping some
validations and hurting others (experiments/README_validate.md); a dedicated GPU does not
drift like a shared CPU.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from twin.executor.anchor_spec import anchor_spread

__all__ = ["SpeedAnchor"]


class SpeedAnchor:
    """The anchor samples of one validation and the ratio they give a profile.

    ``model``: the executor model the samples run on (the profile's anchor model), None when
    the anchor is off; ``reason``: why it is off, or on."""

    def __init__(self, model=None, *, reason: str = "", threads: int | None = None,
                 model_dir: str | None = None):
        self.model, self.reason, self.threads = model, reason, threads
        self.model_dir = model_dir
        self.samples: list[float] = []

    @classmethod
    def for_profile(cls, profile, served, served_dir, *, enabled: bool,
                    threads: int | None) -> "SpeedAnchor":
        """The anchor for validating ``profile`` with the executor model ``served`` (loaded
        from ``served_dir``, None when given loaded): off unless ``enabled``, when the
        profile has no ``speed_anchor_s`` or when its anchor model is not here; samples on
        ``served`` when it is the anchor model, else on that model, loaded."""
        prov = profile.provenance
        if not enabled:
            return cls(reason="off (the default; --speed-anchor turns it on, for a "
                              "shared CPU: a dedicated GPU does not drift)")
        if not prov.get("speed_anchor_s"):
            return cls(reason=f"profile {profile.name!r} has no speed_anchor_s (calibrated "
                              f"without the anchor): twin priced as calibrated, unscaled")
        from twin.executor.speed_anchor import ANCHOR_VERSION   # lazy: needs torch

        if prov.get("speed_anchor_version") != ANCHOR_VERSION:
            return cls(reason=f"profile's anchor is version {prov.get('speed_anchor_version')}"
                              f", this executor's {ANCHOR_VERSION}: unscaled")
        where = Path(str(prov.get("speed_anchor_model", "")))
        if served_dir is not None and where.resolve() == Path(served_dir).resolve():
            return cls(served, reason="on", threads=threads, model_dir=str(where))
        if not (where / "config.json").is_file():
            return cls(reason=f"the profile's anchor model {str(where)!r} is not on this "
                              f"machine: unscaled")
        from twin.executor.model import LlamaModel   # lazy: needs torch

        m = LlamaModel.from_pretrained(where, device=served.device, dtype=served.dtype)
        return cls(m, reason="on", threads=threads, model_dir=str(where))

    @property
    def on(self) -> bool:
        return self.model is not None

    def sample(self) -> float | None:
        """Measure the anchor now (None when off); kept among the samples."""
        if self.model is None:
            return None
        from twin.executor.speed_anchor import measure_speed_anchor   # lazy: needs torch

        s = measure_speed_anchor(self.model, threads=self.threads)["anchor_s"]
        self.samples.append(s)
        return s

    def ratio(self, profile) -> float | None:
        """Anchor during the runs over the profile's at calibration; None when off, without
        samples, or for a profile whose anchor ran on another model."""
        prov = profile.provenance
        if (not self.on or not self.samples or not prov.get("speed_anchor_s")
                or str(prov.get("speed_anchor_model")) != self.model_dir):
            return None
        return statistics.median(self.samples) / float(prov["speed_anchor_s"])

    def info(self, profile) -> dict:
        """What the validation reports: the ratio applied (None: unscaled) and why."""
        r = self.ratio(profile)
        prov = profile.provenance
        return {"applied": r is not None, "ratio": r, "reason": self.reason,
                "calibration_s": prov.get("speed_anchor_s"),
                "calibration_spread": prov.get("speed_anchor_spread"),
                "during_s": statistics.median(self.samples) if self.samples else None,
                # (max - min) / median of the samples: large when the box changed state
                # during the runs, and then one scalar cannot price them (module docstring)
                "during_spread": (anchor_spread(self.samples) if self.samples else None),
                "samples_s": list(self.samples), "model": self.model_dir}
