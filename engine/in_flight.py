"""A decode step launched on the device whose tokens the host has not read yet.

The engine's overlapped decode (EngineConfig.overlap_decode, LLMEngine._finish_in_flight): a decode
step's tokens are sampled on the device and copied to pinned host memory asynchronously; the next
step is launched on those device tokens before the host reads them, and the host then records this
step's tokens (detokenize, stop checks, outputs) while the GPU runs the next one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.request import Sequence
from engine.sampling import sample_on_device


@dataclass
class InFlightDecode:
    """A decode step launched on the device whose tokens the host has not read yet."""

    seqs: list[Sequence]  # row i of tokens is seqs[i]'s next token
    tokens: torch.Tensor  # [B] int64 on the device
    host: torch.Tensor  # [B] int64, filled from tokens asynchronously (pinned on CUDA)
    ready: torch.cuda.Event | None  # recorded after the copy to host (None on CPU)

    @classmethod
    def launch(cls, seqs: list[Sequence], logits: torch.Tensor) -> InFlightDecode:
        tokens = sample_on_device(logits, [seq.sampler for seq in seqs])
        if tokens.device.type != "cuda":
            return cls(seqs, tokens, tokens, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(seqs, tokens, host, ready)

    def token_ids(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()  # this step only: the one launched after it keeps running
        return self.host.tolist()
