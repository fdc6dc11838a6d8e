"""The conv state's ring layout (kernels/conv.py) written out plainly for tests: a slot's [D, W]
ring holds input x_p in cell p % W. Loops over positions, independent of the engine's gathers."""

import torch


def ring_from_window(window: torch.Tensor, start: int) -> torch.Tensor:
    """A [D, W] ring holding window [D, W-1] (the W-1 inputs before position `start`, oldest first)
    at their cells; the cell of position `start` (and of any position < 0) holds noise, which no
    reader may use."""
    D, taps = window.shape
    W = taps + 1
    ring = torch.randn(D, W).to(window.dtype) * 100
    for j in range(taps):
        p = start - taps + j
        if p >= 0:
            ring[:, p % W] = window[:, j]
    return ring


def window_of_ring(ring: torch.Tensor, end: int) -> torch.Tensor:
    """The [D, W-1] inputs before position `end` read back from a [D, W] ring, oldest first; zero
    for positions < 0."""
    D, W = ring.shape
    window = torch.zeros(D, W - 1, dtype=ring.dtype)
    for j in range(W - 1):
        p = end - (W - 1) + j
        if p >= 0:
            window[:, j] = ring[:, p % W]
    return window
