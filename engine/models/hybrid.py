"""The one decoder every supported family runs: pre-norm blocks of (Gated DeltaNet | attention)
token mixer + (dense | MoE) MLP, final norm, LM head.

Canonical parameter names (what the family weight maps produce):
  embed                                  [vocab, hidden]
  layers.{i}.mixer_norm / mlp_norm       [hidden] fp32 (zero-centred +1 already folded in)
  layers.{i}.mixer.*                     see GatedDeltaNet / Attention in layers.py
  layers.{i}.mlp.*                       see MLP / SparseMoE in layers.py
  final_norm                             [hidden] fp32
  lm_head                                [vocab, hidden] (absent when tied to embed)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.config import LINEAR_ATTENTION, ModelConfig
from engine.models.layers import MLP, Attention, GatedDeltaNet, SparseMoE, _param, add_rms_norm, defers_norm
from engine.models.state import Batch, SequenceState
from engine.slots import SlotPool

if TYPE_CHECKING:  # kernels/ (Triton) is imported only where the triton backend runs
    from kernels.decode_linear import SplitK


class Block(nn.Module):
    def __init__(self, config: ModelConfig, index: int, backend: str):
        super().__init__()
        self.is_linear = config.layer_types[index] == LINEAR_ATTENTION
        self.eps = config.rms_norm_eps
        self.backend = backend
        self.mixer_norm = _param(config.hidden_size, fp32=True)
        self.mlp_norm = _param(config.hidden_size, fp32=True)
        if self.is_linear:
            self.mixer = GatedDeltaNet(config.gdn, config.hidden_size, backend)
        else:
            self.mixer = Attention(config.attention, config.hidden_size, config.rms_norm_eps, backend)
        if config.moe is not None and config.moe_layers[index]:
            self.mlp = SparseMoE(config.moe, config.hidden_size)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, backend)

    def forward(self, x: torch.Tensor, delta: torch.Tensor | SplitK | None, batch: Batch, pool: SlotPool,
                index: int) -> tuple[torch.Tensor, torch.Tensor | SplitK]:
        """The residual stream enters and leaves as x + delta ([T, hidden] each; delta None: x alone):
        each add is left to the norm after it, which does both in one kernel on the triton backend (and
        on decode steps there sums delta's split-K products too, when it comes as a SplitK)."""
        decode = batch.decode_only and self.backend == "triton"
        h, x = add_rms_norm(x, delta, self.mixer_norm, self.eps, self.backend,
                            defer=defers_norm(x, delta, self.mixer.reader, decode))
        delta = self.mixer(h, batch, pool, index)
        h, x = add_rms_norm(x, delta, self.mlp_norm, self.eps, self.backend,
                            defer=defers_norm(x, delta, self.mlp.reader, decode))
        return x, self.mlp(h, batch.decode_only)


class HybridLM(nn.Module):
    def __init__(self, config: ModelConfig, backend: str = "torch"):
        super().__init__()
        self.config = config
        self.backend = backend
        self.embed = _param(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i, backend) for i in range(config.num_layers))
        self.final_norm = _param(config.hidden_size, fp32=True)
        if not config.tie_word_embeddings:
            self.lm_head = _param(config.vocab_size, config.hidden_size)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed if self.config.tie_word_embeddings else self.lm_head

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def new_pool(self, num_slots: int, max_len: int | None = None,
                 state_dtype: torch.dtype = torch.float32) -> SlotPool:
        """max_len: positions each slot's attention buffers hold (default: the model's limit);
        state_dtype: how the recurrent states are stored (engine/slots.py)."""
        return SlotPool(self.config, num_slots, self.device, self.embed.dtype,
                        max_len or self.config.max_position_embeddings, state_dtype)

    def new_state(self) -> SequenceState:
        return SequenceState(self.new_pool(1))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, batch: Batch, pool: SlotPool) -> torch.Tensor:
        """Consume the packed new tokens input_ids [T] of the batch's sequences, reading and
        updating their slots; returns final hidden states [T, hidden]."""
        x, delta = self.embed[input_ids], None
        for index, block in enumerate(self.layers):
            x, delta = block(x, delta, batch, pool, index)
        return add_rms_norm(x, delta, self.final_norm, self.config.rms_norm_eps, self.backend)[0]

    def run(self, input_ids: torch.Tensor, state: SequenceState) -> torch.Tensor:
        """One sequence: consume input_ids [T] after the tokens already in `state`."""
        batch = Batch.build([input_ids.shape[0]], [state.slot], [state.num_tokens], self.device)
        hidden = self(input_ids, batch, state.pool)
        state.num_tokens += input_ids.shape[0]
        return hidden

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[T, hidden] -> [T, vocab] fp32; or written into `out` ([T, vocab] in the model's dtype: the same
        products before their conversion to fp32, which a greedy argmax does not need)."""
        if out is not None:  # a decode step's (engine/cuda_graphs.py)
            if self.backend == "triton":
                from kernels.decode_linear import project
                return project(hidden, self.head_weight, out=out)
            return torch.matmul(hidden, self.head_weight.t(), out=out)
        return (hidden @ self.head_weight.t()).float()
