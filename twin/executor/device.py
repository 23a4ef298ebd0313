"""The torch device a command asked for, refused in one line when this machine lacks it.

``--device`` is checked for form by argparse (``twin.argtypes.device_name``); whether the
machine has CUDA is known only to torch, which the executor imports lazily. Every path to
the executor (``execute``, ``calibrate --executor``, ``validate``) asks here, so a CPU-only
torch gives the same input error (not torch's AssertionError, reported as a bug).
"""

from __future__ import annotations

from twin.errors import TwinInputError


def torch_device(name):
    """``torch.device(name)``; TwinInputError (field ``--device``) for CUDA without CUDA."""
    import torch   # lazy: torch is an optional dependency, off `import twin`'s path

    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TwinInputError("CUDA is not available on this machine", field="--device")
    return dev
