"""Split execution (Symbiosis): the frozen base model as a shared service.

One base-executor process holds the base weights once (``base``) and serves the packed
linears, the embedding and the lm_head to N client processes, batching the requests of
the same (layer, op) across clients opportunistically. Each client (``client``) has its
own requests, vLLM-style scheduler, paged KV cache, norms, attention and adapters
(``client_adapters``: PEFT hooks around the base's linears, private to the client), and
exchanges activations with the base through shared memory (``exchange``). A training
client (``trainer``) fine-tunes its own LoRA through the same base (backward: the base's
input gradients). ``driver.execute_split`` runs it all and ``results`` merges the
processes' results into one ``RunResult``; ``colocated`` measures what a trainer costs
inference.
"""

from __future__ import annotations

from twin.executor.split.driver import SplitExecutionError, assign_clients, execute_split
from twin.executor.split.trainer import TrainerSpec

__all__ = ["SplitExecutionError", "TrainerSpec", "assign_clients", "execute_split"]
