"""A HuggingFace transformers model with rope_jit's RoPE, in one call.

    python examples/transformers_model.py

A Llama-3.2-1B-like model built from its config with random weights (nothing is
downloaded), on the GPU, default (SDPA) attention:

1. logits with and without ``apply_rope_jit``: bf16 (with transformers' own bf16 error
   against the fp32 model for scale) and fp32;
2. the time of a prefill forward (bf16, 4 x 2048 tokens) and of a training step (forward
   and backward of the loss, bf16 weights, no optimizer), with and without the patch;
3. the RoPE share of each, from the torch profiler: GPU time of the kernels RoPE runs over
   the GPU time of all kernels of the step. RoPE's kernels are those launched inside a
   ``record_function`` range around the model's ``apply_rotary_pos_emb`` (transformers'
   mul/neg/cat/add kernels, or rope_jit's), those of the backward of the ops in that range
   (autograd's sequence numbers link them), and every ``rope_kernel`` (rope_jit's, in
   whichever pass).

Without a GPU it patches the family, shows what was replaced, and says that running the
model needs an NVIDIA GPU.
"""

from __future__ import annotations

import contextlib
import copy
import statistics

import torch
import transformers
from torch.autograd import DeviceType

from rope_jit.integrations.transformers import apply_rope_jit, revert_rope_jit

BATCH, SEQ = 4, 2048
RANGE = "rope_jit_example::apply_rotary_pos_emb"
CONFIG = dict(  # Llama 3.2 1B's shapes
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192})
modeling = transformers.models.llama.modeling_llama


def without_gpu() -> None:
    print("No NVIDIA GPU here: rope_jit's kernels need one to run the model.")
    print("Patching the llama family replaces:", *apply_rope_jit("llama"), sep="\n  ")
    print("and revert_rope_jit restores:", *revert_rope_jit("llama"), sep="\n  ")


def median_ms(step, iters=10, warmup=3) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@contextlib.contextmanager
def rope_range():
    """The model's apply_rotary_pos_emb (transformers' or rope_jit's) inside a profiler
    range."""
    inner = modeling.apply_rotary_pos_emb

    def ranged(*args, **kwargs):
        with torch.profiler.record_function(RANGE):
            return inner(*args, **kwargs)

    modeling.apply_rotary_pos_emb = ranged
    try:
        yield
    finally:
        modeling.apply_rotary_pos_emb = inner


def rope_share(step) -> tuple:
    """(RoPE GPU time, GPU time of every kernel) of one step, in microseconds."""
    step()
    torch.cuda.synchronize()
    with rope_range(), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU,
                        torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.events()

    def counted(name, user_annotation=False) -> bool:  # kernels, not GPU-side range markers
        return not user_annotation and name != RANGE

    device = [e for e in events if e.device_type == DeviceType.CUDA
              and counted(e.name, e.is_user_annotation)]
    total = sum(e.time_range.elapsed_us() for e in device)
    rope_kernels = sum(e.time_range.elapsed_us() for e in device if e.name == "rope_kernel")
    ranges = [e for e in events if e.name == RANGE and e.device_type == DeviceType.CPU]

    def subtree(e):
        yield e
        for child in e.cpu_children:
            yield from subtree(child)

    forward_ops = {d.sequence_nr for r in ranges for d in subtree(r) if d.sequence_nr >= 0}
    backward = [e for e in events if e.name.startswith("autograd::engine::evaluate_function")
                and e.sequence_nr in forward_ops]
    linked = sum(k.duration for top in ranges + backward for e in subtree(top)
                 for k in e.kernels if k.name != "rope_kernel" and counted(k.name))
    return rope_kernels + linked, total


def main() -> None:
    if not torch.cuda.is_available():
        without_gpu()
        return
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    model = model.to(torch.bfloat16).eval()
    ids = torch.randint(3, CONFIG["vocab_size"], (BATCH, SEQ), device="cuda")
    print(f"Llama-3.2-1B-like model, random weights: {CONFIG['num_hidden_layers']} layers, "
          f"{CONFIG['num_attention_heads']} heads x {CONFIG['head_dim']} "
          f"({CONFIG['num_key_value_heads']} KV heads), bf16, "
          f"{model.config._attn_implementation} attention; batch {BATCH} x {SEQ} tokens; "
          f"{torch.cuda.get_device_name()}")

    # 1. logits
    short = ids[:1, :512]
    with torch.no_grad():
        exact = copy.deepcopy(model).float()
        ref32 = exact(short, use_cache=False).logits
        ref16 = model(short, use_cache=False).logits.float()
        apply_rope_jit(model)  # the llama family: every Llama model in this process
        jit32 = exact(short, use_cache=False).logits
        jit16 = model(short, use_cache=False).logits.float()
        revert_rope_jit(model)
        del exact
    print(f"logits, rope_jit vs transformers: fp32 max |diff| {(jit32 - ref32).abs().max():.2e} "
          f"(max |logit| {ref32.abs().max():.2f}); bf16 max |diff| "
          f"{(jit16 - ref16).abs().max():.3f}, where transformers' own bf16 logits are "
          f"{(ref16 - ref32).abs().max():.3f} from fp32 and rope_jit's "
          f"{(jit16 - ref32).abs().max():.3f}")

    # 2. and 3. time and RoPE share
    def prefill():
        with torch.no_grad():
            model(ids, use_cache=False)

    def train_step():
        model(ids, labels=ids, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)

    rows = {}
    for patched in (False, True):
        if patched:
            apply_rope_jit(model)
        for name, step in (("prefill forward", prefill), ("training step", train_step)):
            rows[name, patched] = (median_ms(step), *rope_share(step))
        if patched:
            revert_rope_jit(model)

    def share(rope_us, kernels_us) -> str:
        if not kernels_us:
            return f"{'n/a (no GPU kernels profiled)':>24s}"
        return f"{100 * rope_us / kernels_us:7.2f}% ({rope_us / 1000:6.2f} ms GPU)"

    print(f"\n{'':16s} {'transformers':>24s} {'rope_jit':>24s} {'speedup':>8s}")
    for name in ("prefill forward", "training step"):
        (t0, r0, k0), (t1, r1, k1) = rows[name, False], rows[name, True]
        print(f"{name:16s} {t0:21.2f} ms {t1:21.2f} ms {t0 / t1:7.3f}x")
        print(f"{'  RoPE share':16s} {share(r0, k0)} {share(r1, k1)}")
    print("\n(median of 10 steps after 3 warm-up steps; RoPE share: torch profiler, RoPE "
          "kernels' GPU time over all kernels' GPU time in one step)")


if __name__ == "__main__":
    main()
