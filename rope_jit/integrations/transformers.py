"""rope_jit's kernels inside HuggingFace transformers models: ``apply_rope_jit``.

transformers' attention layers apply RoPE by calling a function of their modeling module,
``apply_rotary_pos_emb(q, k, cos, sin)`` (DeepSeek-V3 also
``apply_rotary_pos_emb_interleave``, Qwen2-VL's vision tower
``apply_rotary_pos_emb_vision``), which Python looks up in the module's globals each time a
forward runs. ``apply_rope_jit`` replaces those functions, in the modeling module of each
family it is given or finds in a model, with rope_jit's: the same arguments, the same
results within rounding (fp32 arithmetic rounded once), forward and backward.
``revert_rope_jit`` puts back the exact objects it replaced. Nothing else in the model
changes: weights, modules, the rotary embedding that computes cos/sin, attention.

The functions live in the modeling module, so a patch is per family and process-wide:
patching a model instance patches the modules of its families, and every model of those
families in this process, loaded before or after, uses rope_jit's RoPE until reverted
(Liger-Kernel's ``_apply_liger_kernel_to_instance`` does the same for RoPE).

Families are the keys of ``FAMILIES``. Anything else is refused with a ValueError before
anything is patched, never silently left alone: an unknown family, a known family's
function with a signature this version does not know, and a RoPE function
(``apply_*rotary*`` / ``apply_*rope*``) in any module of a model that rope_jit has no
replacement for.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import types
import warnings

import torch

from ..api import apply_rotary_pos_emb, apply_rotary_pos_emb_interleave


def _rotary_pos_emb_with_position_ids(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """``apply_rotary_pos_emb`` with transformers 4's signature (position_ids unused there
    too)."""
    return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)


def _rotary_pos_emb_vision(q, k, cos, sin):
    """Qwen2-VL's vision tower: q, k ``[tokens, heads, head_dim]``, cos, sin ``[tokens,
    head_dim]`` in fp32. transformers computes in fp32 and rounds once to q's dtype, as
    rope_jit's kernel does."""
    return apply_rotary_pos_emb(q, k, cos, sin, -2)


def _multimodal_rotary_pos_emb(q, k, cos, sin, mrope_section, unsqueeze_dim=1):
    """transformers 4's Qwen2-VL mRoPE: cos, sin ``[3, batch, seq, head_dim]``, one row per
    temporal, height and width position. Each frequency section takes its row as
    transformers selects it (on cos/sin, a few small copies), then rope_jit rotates q and k
    in one kernel."""
    sections = list(mrope_section) * 2
    cos = torch.cat([m[i % 3] for i, m in enumerate(cos.split(sections, dim=-1))], dim=-1)
    sin = torch.cat([m[i % 3] for i, m in enumerate(sin.split(sections, dim=-1))], dim=-1)
    return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)


# transformers' RoPE function name -> {its parameter names: rope_jit's replacement}.
REPLACEMENTS = {
    "apply_rotary_pos_emb": {
        ("q", "k", "cos", "sin", "unsqueeze_dim"): apply_rotary_pos_emb,
        ("q", "k", "cos", "sin", "position_ids", "unsqueeze_dim"):
            _rotary_pos_emb_with_position_ids,
    },
    "apply_rotary_pos_emb_interleave": {
        ("q", "k", "cos", "sin", "position_ids", "unsqueeze_dim"):
            apply_rotary_pos_emb_interleave,
    },
    "apply_rotary_pos_emb_vision": {("q", "k", "cos", "sin"): _rotary_pos_emb_vision},
    "apply_multimodal_rotary_pos_emb": {
        ("q", "k", "cos", "sin", "mrope_section", "unsqueeze_dim"): _multimodal_rotary_pos_emb,
    },
}

# Family (transformers' model_type) -> the RoPE functions its modeling module may define,
# each read from that module's source: NeoX pairs (``rotate_half``) with per-token cos/sin
# whose width is the rotary dim (Phi, Phi-3 and GPT-NeoX rotate part of the head).
FAMILIES = {
    "llama": ("apply_rotary_pos_emb",),
    "mistral": ("apply_rotary_pos_emb",),
    "qwen2": ("apply_rotary_pos_emb",),
    "qwen3": ("apply_rotary_pos_emb",),
    "gemma": ("apply_rotary_pos_emb",),
    "gemma3": ("apply_rotary_pos_emb",),
    "phi": ("apply_rotary_pos_emb",),
    "phi3": ("apply_rotary_pos_emb",),
    "gpt_neox": ("apply_rotary_pos_emb",),
    # GPT-J pairs written de-interleaved (config.rope_interleave), or NeoX pairs
    "deepseek_v3": ("apply_rotary_pos_emb", "apply_rotary_pos_emb_interleave"),
    # text: mRoPE sections already selected into cos/sin (transformers 5) or selected by
    # apply_multimodal_rotary_pos_emb (transformers 4); vision: 2-D RoPE over the patches
    "qwen2_vl": ("apply_rotary_pos_emb", "apply_rotary_pos_emb_vision",
                 "apply_multimodal_rotary_pos_emb"),
}
# model_type values of sub-configs that live in a family's modeling module
ALIASES = {"gemma3_text": "gemma3", "qwen2_vl_text": "qwen2_vl"}

_ROPE_FUNCTION = re.compile(r"^_*apply_\w*(rotary|rope)", re.IGNORECASE)
_MODULE_FAMILY = {f"transformers.models.{f}.modeling_{f}": f for f in FAMILIES}

# modeling module name -> {function name: (the object replaced, its replacement)}
_patched: dict = {}


def apply_rope_jit(model_or_family) -> tuple:
    """Replace the RoPE functions of transformers families with rope_jit's.

    model_or_family: a model (any ``torch.nn.Module``: the families of all its submodules
    are patched), a family name (transformers' ``model_type``: ``"llama"``, ``"qwen2_vl"``,
    ...; see ``FAMILIES``), or a modeling module. A family can be patched before its models
    are loaded. Patching is per family and process-wide (module docstring); patching again
    changes nothing. Returns the names of the patched functions
    (``"transformers.models.llama.modeling_llama.apply_rotary_pos_emb"``, ...).

    The model then runs rope_jit's kernels on CUDA tensors (a CPU tensor gets rope_jit's
    TypeError); outputs equal transformers' within rounding, gradients flow to q and k
    (cos and sin, computed from buffers, get none). Raises ValueError, before patching
    anything, for a family or a RoPE function rope_jit does not know.
    """
    plans = [(module, _replacements(family, module))
             for family, module in _modules_of(model_or_family)]
    names = []
    for module, replacements in plans:
        saved = _patched.setdefault(module.__name__, {})
        for name, (original, replacement) in replacements.items():
            saved.setdefault(name, (original, replacement))
            setattr(module, name, replacement)
            names.append(f"{module.__name__}.{name}")
    return tuple(names)


def revert_rope_jit(model_or_family) -> tuple:
    """Undo ``apply_rope_jit`` for the same families: each patched function is replaced by
    the exact object it replaced. A function someone replaced again after rope_jit is left
    alone, with a warning (its original is kept for a later revert). Returns the names of
    the restored functions (none when nothing was patched)."""
    names = []
    for _, module in _modules_of(model_or_family):
        saved = _patched.get(module.__name__, {})
        for name, (original, replacement) in list(saved.items()):
            if getattr(module, name, None) is not replacement:
                warnings.warn(f"{module.__name__}.{name} was replaced after rope_jit patched "
                              "it; left as it is", stacklevel=2)
                continue  # the original stays saved, for when that replacement is undone
            setattr(module, name, original)
            del saved[name]
            names.append(f"{module.__name__}.{name}")
        if not saved:
            _patched.pop(module.__name__, None)
    return tuple(names)


def _supported() -> str:
    return ", ".join(sorted(FAMILIES))


def _family_module(family: str):
    try:
        return importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    except ImportError as e:
        raise ValueError(f"model_or_family: this transformers has no modeling module for "
                         f"{family!r} ({e})") from None


def _modules_of(target) -> list:
    """[(family, modeling module)] that `target` names or uses. Refuses what rope_jit does
    not know."""
    if isinstance(target, str):
        family = ALIASES.get(target, target)
        if family not in FAMILIES:
            raise ValueError(f"model_or_family: rope_jit does not know the transformers family "
                             f"{target!r}; it patches {_supported()}")
        return [(family, _family_module(family))]
    if isinstance(target, types.ModuleType):
        family = _MODULE_FAMILY.get(target.__name__)
        if family is None:
            raise ValueError(f"model_or_family: {target.__name__} is not the modeling module of "
                             f"a family rope_jit knows ({_supported()})")
        return [(family, target)]
    if isinstance(target, torch.nn.Module):
        return _modules_of_model(target)
    raise TypeError(f"model_or_family: expected a torch.nn.Module, a family name or a modeling "
                    f"module, got {type(target).__name__}")


def _modules_of_model(model) -> list:
    """The known families of a model's submodules; a module of any submodule class that
    defines RoPE functions of an unknown family is refused."""
    found, unknown = {}, {}
    for name in dict.fromkeys(type(m).__module__ for m in model.modules()):
        module = sys.modules.get(name)
        if module is None:
            continue
        family = _MODULE_FAMILY.get(name)
        if family is not None:
            found[family] = module
            continue
        rope = _rope_functions(module)
        if rope:
            unknown[name] = rope
    if unknown:
        what = "; ".join(f"{n} defines {', '.join(fns)}" for n, fns in unknown.items())
        raise ValueError(f"model_or_family: {type(model).__name__} uses RoPE that rope_jit does "
                         f"not know ({what}); it patches the families {_supported()}")
    if not found:
        raise ValueError(f"model_or_family: {type(model).__name__} uses no transformers family "
                         f"rope_jit knows; it patches {_supported()}")
    return list(found.items())


def _rope_functions(module) -> list:
    """Names of the module's functions that look like RoPE (not rope_jit's own)."""
    return [n for n, v in vars(module).items()
            if _ROPE_FUNCTION.match(n) and callable(v) and not isinstance(v, type)
            and not getattr(v, "__module__", "").startswith("rope_jit")]


def _replacements(family: str, module) -> dict:
    """{function name: (the function now in the module, rope_jit's replacement)} for one
    family's module (already patched: the originals it replaced). Every RoPE function there
    must be one rope_jit replaces, with a known signature."""
    saved = _patched.get(module.__name__, {})
    known = FAMILIES[family]
    extra = [n for n in _rope_functions(module) if n not in known]
    if extra:
        raise ValueError(f"model_or_family: {module.__name__} defines {', '.join(extra)}, which "
                         f"rope_jit does not replace (it replaces {', '.join(known)}); this "
                         "transformers is newer than this rope_jit")
    out = {}
    for name in known:
        original = saved[name][0] if name in saved else getattr(module, name, None)
        if original is None:
            continue  # not in this transformers version
        params = tuple(inspect.signature(original).parameters)
        replacement = REPLACEMENTS[name].get(params)
        if replacement is None:
            raise ValueError(f"model_or_family: {module.__name__}.{name}{params} has a signature "
                             f"rope_jit does not know (it knows "
                             f"{' or '.join(map(str, REPLACEMENTS[name]))})")
        out[name] = (original, replacement)
    if not out:
        raise ValueError(f"model_or_family: {module.__name__} defines none of {', '.join(known)}")
    return out
