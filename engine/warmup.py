"""Build, at start-up, every Triton kernel variant a mixed step can need, instead of mid-serving.

Some launch shapes depend on how many sequences a step holds (kernels/chunk.py pick_config: the
state pass's V blocks; kernels/recurrent.py decode_launch_config: V blocks and warps), and Triton
builds a kernel the first time it meets a new shape, in the middle of a step: a py-spy trace of the
engine process behind the HTTP server on an H200 spent a fifth of its samples building kernels.
Requests arriving one by one make steps of every size. With decode CUDA graphs, decode-only
steps are covered already (engine/cuda_graphs.py captures every batch size at start-up); this runs
the eager forward once per distinct shape of the other steps: prompt chunks alone, and one-token
sequences (decodes) mixed with a chunk; without graphs, also decode-only steps (the decode kernels',
the decode attention's launch config and the decode projections' row blocks and configs
(kernels/decode_linear.py) change with the batch size). Every sequence of those forwards is on the pool's scratch
slot, which is cleared afterwards: no request's state is read or written. The greedy argmax (kernels/argmax.py on
CUDA, built by the logits' dtype) runs once on each kind of logits a step samples from.
"""

from __future__ import annotations

import logging
import time

import torch

from engine import sampling
from engine.models.hybrid import HybridLM
from engine.models.state import Batch
from engine.slots import SlotPool

log = logging.getLogger(__name__)


def first_of_each(shape_of, max_n: int) -> list[int]:
    """The smallest n in 1..max_n for each distinct shape_of(n)."""
    seen, firsts = set(), []
    for n in range(1, max_n + 1):
        shape = shape_of(n)
        if shape not in seen:
            seen.add(shape)
            firsts.append(n)
    return firsts


def mixed_step_batches(model: HybridLM, pool: SlotPool, max_seqs: int,
                       decode_only: bool = False) -> list[list[int]]:
    """Sequence lengths of the forwards that meet every launch shape: n two-token chunks for each
    distinct chunk-kernel shape, and d one-token sequences before one chunk for each distinct
    single-token kernel shape (the triton backend runs those through the decode kernels); with
    decode_only (an engine without decode graphs), d one-token sequences alone for each distinct
    shape of a decode-only step."""
    gdn = model.config.gdn
    if model.backend != "triton" or gdn is None or not any(r is not None for r in pool.recurrent):
        return []
    from kernels.chunk import pick_config
    from kernels.recurrent import decode_launch_config

    HV, K, V = gdn.num_v_heads, gdn.head_k_dim, gdn.head_v_dim
    state_bytes = pool.state_dtype.itemsize
    chunks = first_of_each(lambda n: pick_config(n, HV, K, V), max_seqs)
    singles = first_of_each(lambda d: decode_launch_config(d, HV, K, V, model.device, state_bytes), max_seqs)
    # The chunks after d singles start d rows into the projection: where a row is not a multiple of
    # 16 bytes, odd and even d give differently aligned pointers, which Triton builds apart.
    if max_seqs >= 2 and 2 not in singles:
        singles.append(2)
    batches = [[2] * n for n in chunks] + [[1] * d + [2] for d in singles]
    if decode_only:
        batches += [[1] * d for d in first_of_each(lambda d: decode_only_shape(model, pool, d), max_seqs)]
    return batches


def projections(model: HybridLM) -> list[tuple[int, int, bool]]:
    """The distinct (N, K, silu) of the projections an eager decode-only forward sends through
    kernels/decode_linear (engine/models/layers.py: Gated DeltaNet in/out, attention qkv (without a
    bias) and o, a dense MLP's gate_up (silu * up fused) and down). The LM head takes it only inside
    DecodeStep (logits(out=)), whose sizes are all run when the graphs are captured."""
    from engine.models.layers import MLP, GatedDeltaNet

    weights = []
    for block in model.layers:
        mixer = block.mixer
        if isinstance(mixer, GatedDeltaNet):
            weights += [(mixer.in_proj, False), (mixer.out_proj, False)]
        else:
            weights += [(mixer.o_proj, False)] + ([] if mixer.spec.qkv_bias else [(mixer.qkv_proj, False)])
        if isinstance(block.mlp, MLP):
            weights += [(block.mlp.gate_up, True), (block.mlp.down, False)]
    return sorted({(w.shape[0], w.shape[1], silu) for w, silu in weights})


def decode_only_shape(model: HybridLM, pool: SlotPool, d: int) -> tuple:
    """What a decode-only step of d sequences compiles by: the one-launch decode step (its shape does
    not change with d) or the unfused decode kernels' launch shape, with attention layers the decode
    attention's launch config, and the launch shapes of its projections (kernels/decode_linear:
    the block of rows and config each takes, None where cuBLAS runs it)."""
    from engine.models.gdn_backend import fused_decode_fits
    from kernels.decode_attention import launch_config
    from kernels.decode_linear import launch_key
    from kernels.recurrent import decode_launch_config

    gdn, attn = model.config.gdn, model.config.attention
    state_bytes = pool.state_dtype.itemsize
    if fused_decode_fits(gdn, d, model.device, state_bytes):
        shape = "one launch"
    else:
        shape = decode_launch_config(d, gdn.num_v_heads, gdn.head_k_dim, gdn.head_v_dim, model.device, state_bytes)
    gemms = tuple(launch_key(d, N, K, silu, model.device, model.embed.dtype) for N, K, silu in projections(model))
    if attn is None or pool.max_len is None:
        return shape, gemms
    kv_bytes = next(k for k in pool.keys if k is not None).element_size()
    return shape, launch_config(d, attn.num_kv_heads, pool.max_len, model.device, kv_bytes), gemms


def sampled_logits(model: HybridLM) -> list[torch.Tensor]:
    """One row of logits of each dtype a step samples from, which kernels/argmax.py (CUDA) compiles by:
    an eager step's fp32 (HybridLM.logits) and a decode graph's in the model's dtype."""
    vocab = model.config.vocab_size
    return [torch.zeros(1, vocab, dtype=dtype, device=model.device) for dtype in {torch.float32, model.embed.dtype}]


@torch.inference_mode()
def warm_up(model: HybridLM, pool: SlotPool, max_seqs: int, decode_only: bool = False) -> int:
    """Run the forwards of mixed_step_batches on the scratch slot, and the greedy argmax on sampled_logits
    (its kernels were otherwise built in the first steps that sampled: bench/engine.py's log on an
    H200, 2026-11-27); returns how many forwards ran."""
    for logits in sampled_logits(model):
        sampling.argmax(logits)
    batches = mixed_step_batches(model, pool, max_seqs, decode_only)
    if not batches:
        return 0
    log.info("building the kernels of %d mixed-step shapes (once per start; Triton caches them on disk)",
             len(batches))
    start = time.perf_counter()
    # From position 1 (a state to continue, so the kernels' continuing branches run too), where the
    # attention buffers hold position 2: two-token chunks write keys at start and start + 1.
    start_at = 1 if pool.max_len is None or pool.max_len >= 3 else 0
    for lens in batches:
        batch = Batch.build(lens, [pool.scratch] * len(lens), [start_at] * len(lens), model.device)
        model(torch.zeros(sum(lens), dtype=torch.long, device=model.device), batch, pool)
    pool.clear_scratch()
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    log.info("built them in %.1f s", time.perf_counter() - start)
    return len(batches)
