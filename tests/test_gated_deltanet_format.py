"""The flash-linear-attention `gated_deltanet` family against an independent, naive reading of
the same checkpoint: fla's tensor names, separate q/k/v convolutions, the token-by-token recurrence
of kernels/reference.py and attention written as explicit masked softmax."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from engine.demo import write_gated_deltanet
from engine.generate import generate
from engine.loader import load_model
from engine.sampling import SamplingParams
from kernels.reference import recurrent_gated_delta_rule

BASE = {"model_type": "gated_deltanet", "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 3,
        "num_heads": 2, "head_dim": 16, "expand_v": 1.5, "conv_size": 4, "use_gate": True,
        "hidden_ratio": 2, "norm_eps": 1e-6, "tie_word_embeddings": False}
VARIANTS = {
    "plain": {},
    "gva_tied_no_gate": {"num_v_heads": 4, "tie_word_embeddings": True, "use_gate": False},
    "neg_eigval_sigmoid_gate": {"allow_neg_eigval": True, "output_gate_activation": "sigmoid",
                                "intermediate_size": 80},
    "hybrid_window": {"attn": {"layers": [1], "num_heads": 4, "num_kv_heads": 2, "window_size": 7,
                               "rope_theta": 500.0, "qkv_bias": True}},
    "hybrid_full": {"attn": {"layers": [0, 2], "num_heads": 2, "rope_theta": 10000.0}},
}


def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _conv_silu(x, w):  # x [T, D], w [D, 1, W]: causal depthwise conv over time
    T = x.shape[0]
    y = F.conv1d(x.t()[None], w, padding=w.shape[-1] - 1, groups=x.shape[1])[0, :, :T]
    return F.silu(y.t())


def _gdn(W, p, h, raw):
    H, K = raw["num_heads"], raw["head_dim"]
    HV = raw.get("num_v_heads") or H
    V = int(K * raw["expand_v"])
    T = h.shape[0]
    q = _conv_silu(h @ W[f"{p}.q_proj.weight"].t(), W[f"{p}.q_conv1d.weight"]).view(T, H, K)
    k = _conv_silu(h @ W[f"{p}.k_proj.weight"].t(), W[f"{p}.k_conv1d.weight"]).view(T, H, K)
    v = _conv_silu(h @ W[f"{p}.v_proj.weight"].t(), W[f"{p}.v_conv1d.weight"]).view(T, HV, V)
    beta = torch.sigmoid(h @ W[f"{p}.b_proj.weight"].t())
    if raw.get("allow_neg_eigval"):
        beta = 2 * beta
    g = -W[f"{p}.A_log"].exp() * F.softplus(h @ W[f"{p}.a_proj.weight"].t() + W[f"{p}.dt_bias"])
    o, _ = recurrent_gated_delta_rule(q, k, v, g, beta)
    o = _rms(o, W[f"{p}.o_norm.weight"])
    if raw.get("use_gate", True):
        z = (h @ W[f"{p}.g_proj.weight"].t()).view(T, HV, V)
        o = o * (torch.sigmoid(z) if raw.get("output_gate_activation") == "sigmoid" else F.silu(z))
    return o.reshape(T, HV * V) @ W[f"{p}.o_proj.weight"].t()


def _attention(W, p, h, attn):
    T, D = h.shape
    nh = attn["num_heads"]
    nkv = attn.get("num_kv_heads") or nh
    d = D // nh
    bias = lambda x: W.get(f"{p}.{x}_proj.bias", 0)  # noqa: E731
    q = (h @ W[f"{p}.q_proj.weight"].t() + bias("q")).view(T, nh, d)
    k = (h @ W[f"{p}.k_proj.weight"].t() + bias("k")).view(T, nkv, d)
    v = (h @ W[f"{p}.v_proj.weight"].t() + bias("v")).view(T, nkv, d)
    inv = 1.0 / attn["rope_theta"] ** (torch.arange(0, d, 2).float() / d)
    ang = torch.arange(T).float()[:, None] * inv[None]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]

    def rope(x):
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)

    q, k = rope(q), rope(k)
    out = torch.zeros(T, nh, d)
    window = attn.get("window_size") or T + 1
    for i in range(T):
        for head in range(nh):
            j0 = max(0, i - window + 1)
            kv = head // (nh // nkv)
            scores = k[j0:i + 1, kv] @ q[i, head] / math.sqrt(d)
            out[i, head] = torch.softmax(scores, 0) @ v[j0:i + 1, kv]
    return out.reshape(T, D) @ W[f"{p}.o_proj.weight"].t()


def naive_logits(folder, raw, ids):
    W = load_file(str(folder / "model.safetensors"))
    x = W["model.embeddings.weight"][ids]
    attn_layers = set((raw.get("attn") or {}).get("layers", []))
    for i in range(raw["num_hidden_layers"]):
        p = f"model.layers.{i}"
        h = _rms(x, W[f"{p}.attn_norm.weight"])
        x = x + (_attention(W, f"{p}.attn", h, raw["attn"]) if i in attn_layers else _gdn(W, f"{p}.attn", h, raw))
        h = _rms(x, W[f"{p}.mlp_norm.weight"])
        x = x + (F.silu(h @ W[f"{p}.mlp.gate_proj.weight"].t()) * (h @ W[f"{p}.mlp.up_proj.weight"].t())) \
            @ W[f"{p}.mlp.down_proj.weight"].t()
    x = _rms(x, W["model.norm.weight"])
    head = W["model.embeddings.weight"] if raw["tie_word_embeddings"] else W["lm_head.weight"]
    return x @ head.t()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    raw = {**BASE, **VARIANTS[request.param]}
    folder = write_gated_deltanet(tmp_path_factory.mktemp(request.param), raw, seed=3)
    return raw, folder, load_model(folder, device="cpu", dtype="float32")


@pytest.mark.parametrize("length", [1, 30, 64, 97])
def test_logits_match_naive_reading_of_the_checkpoint(variant, length):
    raw, folder, loaded = variant
    ids = torch.randint(0, raw["vocab_size"], (length,), generator=torch.Generator().manual_seed(length))
    expected = naive_logits(folder, raw, ids)
    got = loaded.model.logits(loaded.model.run(ids, loaded.model.new_state()))
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_decode_steps_continue_the_prompt_exactly(variant):
    # Token-by-token decoding with the carried state must give the logits of one long prefill.
    raw, folder, loaded = variant
    ids = torch.randint(0, raw["vocab_size"], (40,), generator=torch.Generator().manual_seed(7))
    expected = naive_logits(folder, raw, ids)
    state = loaded.model.new_state()
    hidden = [loaded.model.run(ids[:25], state)]
    hidden += [loaded.model.run(ids[t:t + 1], state) for t in range(25, 40)]
    torch.testing.assert_close(loaded.model.logits(torch.cat(hidden)), expected, atol=2e-4, rtol=1e-4)


def test_greedy_generation_follows_naive_argmax(variant):
    raw, folder, loaded = variant
    ids = [5, 17, 200, 3, 99]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    got = [step.token_id for step in generate(loaded, ids, params)]
    seq = list(ids)
    for _ in range(6):
        seq.append(int(naive_logits(folder, raw, torch.tensor(seq))[-1].argmax()))
    assert got == seq[len(ids):]
