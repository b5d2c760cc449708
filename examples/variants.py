"""Every RoPE variant from a HuggingFace-style config: build it with
rope_jit.rope_from_hf_config, compare its cos/sin cache with transformers, and apply it on
the GPU.

For each config below (Llama 3.1, linear, dynamic NTK, Qwen2.5 YaRN, gpt-oss-style YaRN,
DeepSeek-V3, vLLM's deepseek_yarn, Phi-3 LongRoPE, proportional, partial rotation,
GPT-J style, Qwen2-VL and Qwen3-VL mRoPE) it prints:

* ``vs HF fp32``: the largest difference between the float32 cache and the cos/sin
  transformers' own rotary embedding of that model computes (in float32, so this is
  mostly transformers' float32 rounding of inv_freq and of the angle p * inv_freq);
* ``vs HF f64``: the same against transformers' code run in float64 (its formulas
  exactly), in float32 ulps: the cache is that, rounded once (<= 0.5 ulp);
* on a GPU, the largest error of ``rope.forward`` (bf16 q/k) against the float64
  reference fed the same cache rows, in bf16 ulps; elements whose result cancels to a
  tiny fraction of their inputs are counted apart (there the fp32 arithmetic's rounding,
  about 2^-24 of the inputs, is more than an ulp of the result; docs/math.md#precision).

Needs transformers (and torch) for the comparisons; applying needs an NVIDIA GPU.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import time

import numpy as np

import rope_jit
from rope_jit import reference
from rope_jit.reference import mrope_cos_sin


def _factors(n, top):
    return [round(1.0 + (top - 1.0) * (i / (n - 1)) ** 2, 4) for i in range(n)]


LLAMA = {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32, "rope_theta": 500000.0}

# name -> (config.json-style dict, max_position override to keep the demo quick, or None)
CONFIGS = {
    "llama3 (Llama-3.1-8B)": ({**LLAMA, "max_position_embeddings": 131072, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}}, 16384),
    "linear (factor 4)": ({**LLAMA, "rope_theta": 10000.0, "max_position_embeddings": 4096,
                           "rope_scaling": {"type": "linear", "factor": 4.0}}, None),
    "dynamic (factor 2)": ({**LLAMA, "rope_theta": 10000.0, "max_position_embeddings": 4096,
                            "rope_scaling": {"type": "dynamic", "factor": 2.0}}, None),
    "yarn (Qwen2.5-7B, 128k)": ({"model_type": "qwen2", "hidden_size": 3584, "num_attention_heads": 28,
                                 "rope_theta": 1e6, "max_position_embeddings": 131072,
                                 "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                  "original_max_position_embeddings": 32768}}, 16384),
    "yarn (gpt-oss style, no truncate)": ({**LLAMA, "hidden_size": 4096, "num_attention_heads": 64,
                                           "rope_theta": 150000.0, "max_position_embeddings": 131072,
                                           "rope_scaling": {"rope_type": "yarn", "factor": 32.0,
                                                            "beta_fast": 32.0, "beta_slow": 1.0,
                                                            "truncate": False,
                                                            "original_max_position_embeddings": 4096}},
                                          16384),
    "yarn (DeepSeek-V3, GPT-J style)": ({"model_type": "deepseek_v3", "hidden_size": 7168,
                                         "num_attention_heads": 128, "qk_rope_head_dim": 64,
                                         "qk_nope_head_dim": 128, "v_head_dim": 128, "rope_theta": 10000,
                                         "max_position_embeddings": 163840,
                                         "rope_scaling": {"type": "yarn", "factor": 40, "mscale": 1.0,
                                                          "mscale_all_dim": 1.0, "beta_fast": 32,
                                                          "beta_slow": 1,
                                                          "original_max_position_embeddings": 4096}},
                                        None),
    "deepseek_yarn (vLLM's name)": ({**LLAMA, "hidden_size": 2048, "num_attention_heads": 16,
                                     "head_dim": 64, "rope_theta": 10000, "max_position_embeddings": 40960,
                                     "rope_scaling": {"type": "deepseek_yarn", "factor": 10, "mscale": 0.707,
                                                      "mscale_all_dim": 0.707,
                                                      "original_max_position_embeddings": 4096}}, None),
    "longrope (Phi-3-mini-128k)": ({"model_type": "phi3", "hidden_size": 3072, "num_attention_heads": 32,
                                    "rope_theta": 10000.0, "max_position_embeddings": 131072,
                                    "original_max_position_embeddings": 4096,
                                    "rope_scaling": {"type": "longrope", "short_factor": _factors(48, 1.2),
                                                     "long_factor": _factors(48, 60.0)}}, None),
    "proportional (Gemma-4 style)": ({**LLAMA, "hidden_size": 2048, "num_attention_heads": 8, "head_dim": 256,
                                      "max_position_embeddings": 8192,
                                      "rope_parameters": {"rope_type": "proportional", "rope_theta": 1e6,
                                                          "partial_rotary_factor": 0.25}}, None),
    "default, partial 0.4 (Phi-2)": ({"model_type": "phi", "hidden_size": 2560, "num_attention_heads": 32,
                                      "partial_rotary_factor": 0.4, "rope_theta": 10000.0,
                                      "max_position_embeddings": 2048}, None),
    "mrope (Qwen2-VL-7B)": ({"model_type": "qwen2_vl", "hidden_size": 3584, "num_attention_heads": 28,
                             "rope_theta": 1e6, "max_position_embeddings": 32768,
                             "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}, 4096),
    "mrope interleaved (Qwen3-VL)": ({"model_type": "qwen3_vl_text", "hidden_size": 2048, "num_attention_heads": 16,
                                      "head_dim": 128, "rope_theta": 5e6, "max_position_embeddings": 32768,
                                      "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20],
                                                       "mrope_interleaved": True}}, 4096),
}

# transformers' rotary embedding class of each model type (same formulas for all of them;
# using the model's own class checks the config handling too)
HF_ROTARY = {"llama": ("llama", "LlamaRotaryEmbedding"), "qwen2": ("qwen2", "Qwen2RotaryEmbedding"),
             "deepseek_v3": ("deepseek_v3", "DeepseekV3RotaryEmbedding"),
             "phi3": ("phi3", "Phi3RotaryEmbedding"), "phi": ("phi", "PhiRotaryEmbedding"),
             "qwen2_vl": ("qwen2_vl", "Qwen2VLRotaryEmbedding"),
             "qwen3_vl_text": ("qwen3_vl", "Qwen3VLTextRotaryEmbedding")}


@contextlib.contextmanager
def float64_torch(torch):
    """Run transformers' RoPE code (written for torch.float) in float64: its formulas
    exactly, without its float32 rounding. For comparison only."""
    saved = torch.float, torch.float32, torch.Tensor.float
    torch.float = torch.float32 = torch.float64
    torch.Tensor.float = torch.Tensor.double
    try:
        yield
    finally:
        torch.float, torch.float32, torch.Tensor.float = saved


def hf_cos_sin(transformers, torch, config, max_position, positions, float64):
    """transformers' cos, sin [T, R/2] (times attention_scaling) at positions ([T], or
    [3, T] for mRoPE). deepseek_yarn is transformers' yarn with the same numbers."""
    cfg = dict(config)
    if max_position is not None:
        cfg["max_position_embeddings"] = max_position
    if (cfg.get("rope_scaling") or {}).get("type") == "deepseek_yarn":
        cfg["rope_scaling"] = {**cfg["rope_scaling"], "type": "yarn"}
    module, cls = HF_ROTARY.get(cfg["model_type"], ("phi", "PhiRotaryEmbedding"))
    if cfg["model_type"] not in HF_ROTARY:  # a config transformers has no model for: Phi's class
        cfg = {**cfg, "model_type": "phi", "partial_rotary_factor": 1.0}
        if "rope_parameters" in cfg:
            cfg["partial_rotary_factor"] = cfg["rope_parameters"]["partial_rotary_factor"]
    cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), cls)
    with float64_torch(torch) if float64 else contextlib.nullcontext():
        hf_config = transformers.AutoConfig.for_model(**cfg)
        rope = cls(getattr(hf_config, "text_config", None) or hf_config)
        pos = torch.as_tensor(positions)
        pos = pos[:, None] if pos.ndim == 2 else pos[None]
        cos, sin = rope(torch.zeros(1, dtype=torch.float64 if float64 else torch.float32), pos)
    half = cos.shape[-1] // 2
    return cos[0, :, :half].double().numpy(), sin[0, :, :half].double().numpy()


def positions_for(rope, n, seed):
    rng = np.random.default_rng(seed)
    top = rope.max_position_embeddings
    if isinstance(rope, rope_jit.MRotaryEmbedding):
        pos = rng.integers(0, top, (3, n))
        pos[:, : n // 4] = pos[0, : n // 4]  # some text tokens
        return pos
    pos = rng.integers(0, top, n)
    pos[0] = top - 1
    return pos


def rows_of(rope, positions):
    """float64 cos, sin the object's cache holds for these positions."""
    cache = rope.get_cos_sin_cache().astype(np.float64)
    if positions.ndim == 2:
        return mrope_cos_sin(cache, positions, rope.mrope_section, rope.mrope_interleaved)
    row0 = rope.scaling.row_offset(int(positions.max()) + 1)
    return reference.cos_sin_from_cache(cache, row0 + positions)


def compare_with_transformers(name, rope, config, max_position):
    try:
        import torch
        import transformers
    except ImportError:
        return "transformers not installed: no comparison"
    transformers.logging.set_verbosity_error()
    pos = positions_for(rope, 256, seed=len(name))
    c, s = rows_of(rope, pos)
    out = []
    for float64 in (False, True):
        hc, hs = hf_cos_sin(transformers, torch, config, max_position, pos, float64)
        err = max(np.abs(c - hc).max(), np.abs(s - hs).max())
        if float64:
            ulps = max((np.abs(c - hc) / reference.ulp(hc, "float32")).max(),
                       (np.abs(s - hs) / reference.ulp(hs, "float32")).max())
            out.append(f"vs HF f64 {ulps:4.2f} ulp")
        else:
            out.append(f"vs HF fp32 {err:8.2e}")
    return ", ".join(out)


def apply_on_gpu(rope, seed):
    import torch

    T, hq, hk, D = 300, 8, 2, rope.head_size
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(T, hq, D, generator=g, device="cuda").to(torch.bfloat16)
    k = torch.randn(T, hk, D, generator=g, device="cuda").to(torch.bfloat16)
    pos_np = positions_for(rope, T, seed)
    pos = torch.as_tensor(pos_np, device="cuda")
    q64, k64 = q.double().cpu().numpy(), k.double().cpu().numpy()
    rope.forward(pos, q, k)
    c, s = rows_of(rope, pos_np)
    worst, cancelling = 0.0, 0
    for out, x in ((q, q64), (k, k64)):
        ref = reference.apply_rotary(x, c, s, rope.is_neox_style)
        err = np.abs(out.double().cpu().numpy() - ref)
        # |x1| + |x2| of each element's pair: where the result cancels to a tiny fraction of
        # it, the fp32 arithmetic's rounding (~2^-24 of it) exceeds an ulp of the result
        half = rope.rotary_dim // 2
        xr = np.abs(x[..., :rope.rotary_dim])
        mag = np.zeros_like(x)
        mag[..., :rope.rotary_dim] = (np.concatenate([xr[..., :half] + xr[..., half:]] * 2, -1)
                                      if rope.is_neox_style else
                                      np.repeat(xr[..., 0::2] + xr[..., 1::2], 2, -1))
        cancel = np.abs(ref) < mag * 2.0 ** -14
        assert (err[cancel] <= 2.0 ** -21 * mag[cancel] * 2).all(), "beyond fp32 rounding"
        cancelling += int(cancel.sum())
        worst = max(worst, float(np.max((err / reference.ulp(ref, "bfloat16"))[~cancel])))
    extra = f" (+{cancelling} cancelling to < 2^-14 of |x|: within fp32 rounding)" if cancelling else ""
    return f"GPU forward {worst:.2f} bf16 ulp{extra}"


def main() -> None:
    from rope_jit._cuda import device_count

    gpu = device_count() > 0
    print(f"rope_jit {rope_jit.__version__}; {'GPU present' if gpu else 'no GPU'}")
    for i, (name, (config, max_position)) in enumerate(CONFIGS.items()):
        t0 = time.perf_counter()
        rope = rope_jit.rope_from_hf_config(config, max_position=max_position)
        rope.get_cos_sin_cache()
        build = time.perf_counter() - t0
        s = rope.scaling
        line = (f"{name:<36s} {s.rope_type:<13s} R={rope.rotary_dim:<3d} rows={s.cache_length:<6d} "
                f"af={s.attention_factor:.4f} {'neox' if rope.is_neox_style else 'gptj'} "
                f"({build * 1e3:4.0f} ms) | {compare_with_transformers(name, rope, config, max_position)}")
        if gpu:
            line += " | " + apply_on_gpu(rope, i)
        print(line)
    # dynamic NTK past its original length: the frequencies follow the sequence
    dyn = rope_jit.rope_from_hf_config(CONFIGS["dynamic (factor 2)"][0])
    grown = dyn.update(10000)
    print(f"dynamic at seq_len 10000: base {dyn.base:.0f} -> {grown.base:.1f}, cache rows {grown.cache_length}")
    if not gpu:
        print("No NVIDIA GPU here: the caches were built and compared, but applying them needs an "
              "NVIDIA GPU.")


if __name__ == "__main__":
    main()
