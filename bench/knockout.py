"""What each kind of decode-step kernel costs inside the graphed step: bench/engine.py with that kind
replaced by a stand-in that launches nothing (its output allocated, its values garbage).

With every kernel launching early (kernels/pdl.py), a kernel's time alone says little about what the
step would lose without it; the step's time with the kind knocked out says at most what fusing it
away could save. Timing only: the tokens are meaningless, so run it without the greedy checks.

    python3 bench/knockout.py --knock norms -- --batches 1,32 --hf-batches "" --check-dtypes ""

Kinds (comma list; each is also timed alone by running this once per kind):
  norms        the pre-norms and the final norm (kernels/norm.rms_norm); norms already folded into a
               one-row projection (kernels/decode_gemv) launch nothing anyway
  gated_norms  the Gated DeltaNet output norm of the unfused path (kernels/norm.gated_rms_norm)
  gdn          the Gated DeltaNet decode step (one-launch or conv + delta rule)
  projections  every projection, the LM head too (kernels/decode_linear.project, decode_gemv within it)
  attention    rope + key/value store and decode attention (or both as one launch, at one split)
  argmax       the greedy argmax
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _empty(rows: int, *shape: int, like) -> torch.Tensor:
    return torch.empty(rows, *shape, dtype=like.dtype, device=like.device)


def knock_out(kinds: list[str], set_attr=setattr) -> None:
    """Replace each kind's entry point by a stand-in with the same outputs' shapes and no launch (through
    set_attr: a test's monkeypatch.setattr undoes it)."""
    from engine import sampling
    from engine.models import gdn_backend
    from kernels import decode_attention, decode_linear, norm, rope

    def project(x, w, silu=False, out=None, partial=False):
        return out if out is not None else _empty(x.shape[0], w.shape[0] // (2 if silu else 1), like=x)

    stand_ins = {
        "norms": [(norm, "rms_norm", lambda x, weight, eps=1e-6, residual=None: x if residual is None else (x, x))],
        "gated_norms": [(norm, "gated_rms_norm", lambda x, z, weight, eps=1e-6: x)],
        "gdn": [(gdn_backend, "fused_decode", lambda spec, qkv, *rest: _empty(qkv.shape[0], spec.value_dim, like=qkv)),
                (gdn_backend, "conv_delta_rule_decode", lambda spec, qkv, *rest: _empty(
                    qkv.shape[0], spec.num_v_heads, spec.head_v_dim, like=qkv))],
        "projections": [(decode_linear, "project", project)],
        "attention": [(rope, "qk_norm_rope_store", lambda q, *rest: q),
                      (decode_attention, "decode_attention", lambda q, *rest: torch.empty_like(q)),
                      (decode_attention, "rope_decode_attention", lambda q, *rest, **kwargs: torch.empty(
                          q.shape, dtype=q.dtype, device=q.device))],
        "argmax": [(sampling, "argmax", lambda logits: torch.zeros(logits.shape[0], dtype=torch.long,
                                                                   device=logits.device))],
    }
    unknown = [kind for kind in kinds if kind not in stand_ins]
    if unknown:
        raise SystemExit(f"unknown kind(s) {unknown}: choose from {sorted(stand_ins)}")
    for kind in kinds:
        for module, name, stand_in in stand_ins[kind]:
            set_attr(module, name, stand_in)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--knock", required=True, help="comma list of kinds to knock out (see above)")
    parser.add_argument("engine_args", nargs=argparse.REMAINDER, help="after --: bench/engine.py's arguments")
    args = parser.parse_args()
    knock_out([k for k in args.knock.split(",") if k])
    rest = args.engine_args[1:] if args.engine_args[:1] == ["--"] else args.engine_args
    sys.argv = [str(ROOT / "bench" / "engine.py"), *rest]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
