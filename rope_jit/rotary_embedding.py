"""vLLM-style rotary embedding objects: ``get_rope`` returns a ``RotaryEmbedding`` that owns
its cos/sin cache and applies it in place with ``rope_jit.apply_rope_inplace_with_cache``.

Every RoPE variant of ``rope_jit.scaling`` (default, linear, dynamic NTK, YaRN,
DeepSeek-YaRN, Llama 3, LongRoPE, proportional) and multimodal RoPE (``mrope_section``,
Qwen2-VL / Qwen3-VL). No torch dependency: the objects work with torch tensors, CuPy arrays
or any array ``rope_jit`` accepts, and keep one cache per framework and device.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .arrays import framework_of
from .dtypes import FLOAT_DTYPES, dtype_name
from .scaling import RopeScaling, resolve_rope_scaling


def _seq_len_of(positions) -> int:
    """Largest position + 1 (0 for no positions). Reads a device array back: a host sync."""
    numel = getattr(positions, "numel", None)  # torch: numel(); NumPy, CuPy: size
    if (numel() if callable(numel) else int(positions.size)) == 0:
        return 0
    return int(positions.max()) + 1


class RotaryEmbedding:
    """Rotary embedding with a cos/sin cache (vLLM's ``RotaryEmbedding`` and its scaled
    subclasses in one class). Build it with :func:`get_rope` or :func:`rope_from_hf_config`.

    Attributes as vLLM's: ``head_size``, ``rotary_dim``, ``max_position_embeddings``,
    ``base``, ``is_neox_style``, ``dtype`` (the cache dtype name); plus ``scaling`` (the
    active :class:`rope_jit.scaling.RopeScaling`) and ``rope_scaling`` (the dict).

    The cache is built on first use, once per framework and device of the query
    (``get_cos_sin_cache(like)``), in float64 rounded once to ``dtype``; ``cos_sin_cache``
    is the one built last (the host NumPy cache before any device use).

    Sequence-length-dependent variants: ``forward`` needs the batch's sequence length,
    ``max(positions) + 1``. Pass ``seq_len=`` to avoid the host sync of reading it back.

    * dynamic NTK follows transformers' ``dynamic_rope_update``: when ``seq_len`` exceeds
      the length the frequencies were computed for, they are recomputed for ``seq_len``
      (a new base) and the cache is rebuilt (``O(seq_len * rotary_dim)`` host work and a
      copy: each new maximum costs that, as in transformers); when ``seq_len`` falls back
      below ``max_position_embeddings`` the original frequencies (and their cache, kept)
      return. Objects returned by ``get_rope`` are shared, so every layer sees one state.
    * longrope reads the short table when ``seq_len <= original_max_position_embeddings``
      and the long one otherwise (transformers' rule); the two are row ranges of one
      cache, so no position offset is materialized. vLLM >= 0.11 decides once from the
      model's max length: pass that as ``seq_len`` to do the same.
    """

    def __init__(self, head_size: int, rotary_dim: int, max_position_embeddings: int,
                 base: float | None = None, is_neox_style: bool = True, dtype=None, *,
                 rope_scaling: Mapping | None = None):
        """rotary_dim and rope_scaling as :func:`rope_jit.scaling.resolve_rope_scaling`:
        ``int(rotary_dim * partial_rotary_factor)`` dims rotate when the dict has one."""
        if isinstance(head_size, bool) or not isinstance(head_size, numbers.Integral) or head_size <= 0:
            raise ValueError(f"head_size: expected a positive integer, got {head_size!r}")
        if isinstance(max_position_embeddings, bool) or not isinstance(max_position_embeddings, numbers.Integral) \
                or max_position_embeddings < 0:
            raise ValueError(f"max_position: expected a non-negative integer, got "
                             f"{max_position_embeddings!r}")
        if not isinstance(is_neox_style, bool):
            raise ValueError(f"is_neox_style: expected a bool, got {is_neox_style!r}")
        name = "float32" if dtype is None else dtype_name(dtype)
        if name not in FLOAT_DTYPES:
            raise TypeError(f"dtype: expected float16, bfloat16 or float32 (the cache dtype), "
                            f"got {dtype!r}")
        self._resolve_args = (None if rope_scaling is None else dict(rope_scaling), rotary_dim,
                              base, int(max_position_embeddings))
        scaling = resolve_rope_scaling(*self._resolve_args)
        if scaling.rotary_dim > head_size:
            raise ValueError(f"rotary_dim: {scaling.rotary_dim} rotated dims exceed head_size "
                             f"{head_size}")
        self.head_size = int(head_size)
        self.rotary_dim = scaling.rotary_dim
        self.max_position_embeddings = int(max_position_embeddings)
        self.base = scaling.original_base if scaling.original_base is not None else scaling.base
        self.is_neox_style = is_neox_style
        self.dtype = name
        self.rope_scaling = None if rope_scaling is None else MappingProxyType(dict(rope_scaling))
        self.scaling: RopeScaling = scaling
        self._original = scaling
        self._dynamic = scaling.rope_type == "dynamic"
        self._longrope = scaling.rope_type == "longrope"
        # transformers' max_seq_len_cached: the length the dynamic frequencies are for
        self._cached_len = self.max_position_embeddings
        # Caches are keyed by a tag of the scaling they were built for (0: the original one;
        # dynamic NTK numbers each new state), so a grown state never reads a stale cache.
        self._tag = 0
        self._original_tag = 0
        self._tags_used = 0
        self._hosts: dict = {}    # tag -> host NumPy cache
        self._devices: dict = {}  # (array type, device, tag) -> (whole, short, long) caches
        self._last = None

    # ------------------------------------------------------------------ state

    def update(self, seq_len: int) -> RopeScaling:
        """Bring the sequence-length-dependent state up to ``seq_len`` (largest position
        + 1) and return the active scaling. Only dynamic NTK has state (see the class
        docstring); other variants return ``scaling`` unchanged."""
        if not self._dynamic:
            return self.scaling
        if seq_len > self._cached_len:  # growth: frequencies for the new length
            rope_scaling, rotary_dim, base, max_position = self._resolve_args
            self.scaling = resolve_rope_scaling(rope_scaling, rotary_dim, base, max_position,
                                                seq_len=seq_len)
            self._tags_used += 1
            self._set_tag(self._tags_used)
            self._cached_len = seq_len
        elif seq_len < self.max_position_embeddings < self._cached_len:  # back to the original
            self.scaling = self._original
            self._set_tag(self._original_tag)
            self._cached_len = self.max_position_embeddings
        return self.scaling

    def _set_tag(self, tag: int) -> None:
        """Switch to the caches of `tag`, dropping those of any other grown state (the
        original's are kept: falling back below max_position is common)."""
        self._tag = tag
        keep = {self._original_tag, tag}
        self._hosts = {k: v for k, v in self._hosts.items() if k in keep}
        self._devices = {k: v for k, v in self._devices.items() if k[2] in keep}

    # ------------------------------------------------------------------ caches

    def _host(self):
        host = self._hosts.get(self._tag)
        if host is None:
            host = self._hosts[self._tag] = self.scaling.cos_sin_cache(self.dtype)
        return host

    def _device_entry(self, like):
        dev = getattr(like, "device", None)
        try:
            key = (type(like), dev, self._tag)
            hash(key)
        except TypeError:
            fw = framework_of(like, "query")
            key = (type(like), fw.describe(like).device, self._tag)
        entry = self._devices.get(key)
        if entry is None:
            cache = framework_of(like, "query").from_host(self._host(), like)
            if self._longrope:
                orig = self.scaling.original_max_position
                entry = (cache, cache[:orig], cache[orig:])  # whole, short table, long table
            else:
                entry = (cache, cache, cache)
            self._devices[key] = entry
        self._last = entry[0]
        return entry

    def get_cos_sin_cache(self, like=None):
        """The whole cache ``[rows, rotary_dim]`` of the active scaling: host NumPy, or on
        the framework and device of ``like`` (built there once)."""
        if like is None:
            return self._host()
        return self._device_entry(like)[0]

    @property
    def cos_sin_cache(self):
        """The cache built last (the host NumPy cache before any device use)."""
        if self._last is None:
            return self._host()
        return self._last

    # ------------------------------------------------------------------ forward

    def _prepare(self, positions, query, seq_len):
        if self._dynamic or self._longrope:
            if seq_len is None:
                seq_len = _seq_len_of(positions)
            elif isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral) or seq_len < 0:
                raise ValueError(f"seq_len: expected a non-negative integer, got {seq_len!r}")
            self.update(int(seq_len))
        whole, short, long = self._device_entry(query)
        if self._longrope and seq_len > self.scaling.original_max_position:
            return long
        return short if self._longrope else whole

    def forward(self, positions, query, key=None, offsets=None, *, seq_len: int | None = None,
                check_positions: bool = False, rope_dim_offset: int = 0,
                inverse: bool = False, enable_pdl: bool = False):
        """Rotate query and key (may be None) in place and return ``(query, key)``, as
        vLLM's ``forward_cuda``. positions ``[num_tokens]`` (or ``[batch, seq]``); query /
        key ``[tokens..., heads * head_size]`` or ``[tokens..., heads, head_size]``.
        ``offsets`` (vLLM's batched LoRA offsets) are added to positions (one allocation).
        ``seq_len``: largest position + 1, for dynamic and longrope (read from positions
        otherwise: a host sync). ``check_positions``, ``rope_dim_offset`` (rotate the dims
        after it), ``inverse`` (rotate by the negative angle) and ``enable_pdl`` as
        ``apply_rope_inplace_with_cache``. Under torch.compile, call it once eagerly first:
        building the device cache from the host is not traceable (README "Frameworks")."""
        from .api import apply_rope_inplace_with_cache

        if offsets is not None:
            positions = positions + offsets
        cache = self._prepare(positions, query, seq_len)
        apply_rope_inplace_with_cache(positions, query, key, self.head_size, cache,
                                      self.is_neox_style, rope_dim_offset, inverse,
                                      check_positions=check_positions, enable_pdl=enable_pdl)
        return query, key

    __call__ = forward

    def extra_repr(self) -> str:
        return (f"head_size={self.head_size}, rotary_dim={self.rotary_dim}, "
                f"max_position_embeddings={self.max_position_embeddings}, base={self.base}, "
                f"is_neox_style={self.is_neox_style}, rope_type={self.scaling.rope_type}, "
                f"dtype={self.dtype}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class MRotaryEmbedding(RotaryEmbedding):
    """Multimodal RoPE (vLLM's ``MRotaryEmbedding``): positions ``[3, num_tokens]``
    (temporal, height, width) select, per frequency, which row's angle applies:
    ``mrope_section`` (t, h, w counts summing to rotary_dim/2) in chunks (Qwen2-VL) or
    interleaved (``mrope_interleaved``, Qwen3-VL). 1-D positions (text only) are plain
    RoPE. The cache has ``4 * max_position`` rows (vLLM's room for video positions)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.scaling.mrope_section is None:
            raise ValueError("rope_scaling['mrope_section']: required for MRotaryEmbedding")
        self.mrope_section = list(self.scaling.mrope_section)
        self.mrope_interleaved = self.scaling.mrope_interleaved

    def forward(self, positions, query, key=None, offsets=None, *, seq_len: int | None = None,
                check_positions: bool = False):
        """As :meth:`RotaryEmbedding.forward`; positions ``[3, num_tokens]`` apply the
        sections (``rope_jit.apply_mrope_inplace_with_cache``), ``[num_tokens]`` plain RoPE."""
        ndim = len(positions.shape)
        if ndim == 1:
            return super().forward(positions, query, key, offsets, seq_len=seq_len,
                                   check_positions=check_positions)
        tokens = query.shape[0] if len(getattr(query, "shape", ())) else None
        if ndim != 2 or positions.shape[0] != 3 or positions.shape[1] != tokens:
            raise ValueError(f"positions: expected [num_tokens] or [3, num_tokens] with "
                             f"num_tokens = query.shape[0] = {tokens}, got "
                             f"{list(positions.shape)}")
        from .api import apply_mrope_inplace_with_cache

        if offsets is not None:
            positions = positions + offsets
        cache = self._prepare(positions, query, seq_len)
        apply_mrope_inplace_with_cache(positions, query, key, self.head_size, cache,
                                       self.is_neox_style, self.mrope_section,
                                       self.mrope_interleaved, check_positions=check_positions)
        return query, key

    __call__ = forward


# ---------------------------------------------------------------------- get_rope

_ROPE_CACHE: dict = {}


def _freeze(v):
    if isinstance(v, Mapping):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


def get_rope(head_size: int, rotary_dim: int, max_position: int, base: float | None,
             is_neox_style: bool = True, rope_scaling: Mapping | None = None, dtype=None,
             partial_rotary_factor: float = 1.0) -> RotaryEmbedding:
    """vLLM's ``get_rope``: a rotary embedding for any RoPE variant.

    head_size, rotary_dim, max_position, base, is_neox_style: as vLLM. ``rotary_dim`` is
    multiplied by ``partial_rotary_factor`` (or by the dict's ``partial_rotary_factor``;
    both given and different raises). ``base`` None: the dict's ``rope_theta``, else
    10000; both given and different raises. rope_scaling: a HuggingFace-style dict
    (``rope_type`` / ``type``: default, linear, dynamic, yarn, deepseek_yarn, llama3,
    longrope, proportional, mrope); with ``mrope_section`` the result is an
    :class:`MRotaryEmbedding`. dtype: the cache dtype (float32, bfloat16, float16; default
    float32, whatever the query dtype: rope_jit reads any cache dtype).

    Objects are shared between calls with equal arguments (as vLLM's), so the layers of a
    model hold one cache per device.
    """
    if isinstance(partial_rotary_factor, bool) or not isinstance(partial_rotary_factor, numbers.Real) \
            or not 0.0 < partial_rotary_factor <= 1.0:
        raise ValueError(f"partial_rotary_factor: expected a number in (0, 1], got "
                         f"{partial_rotary_factor!r}")
    if rope_scaling is not None and not isinstance(rope_scaling, Mapping):
        raise ValueError(f"rope_scaling: expected a dict or None, got {type(rope_scaling).__name__}")
    d = dict(rope_scaling or {})
    in_dict = d.get("partial_rotary_factor")
    if partial_rotary_factor != 1.0:
        if in_dict is not None and in_dict != partial_rotary_factor:
            raise ValueError(f"partial_rotary_factor: {partial_rotary_factor!r} differs from "
                             f"rope_scaling['partial_rotary_factor'] = {in_dict!r}")
        d["partial_rotary_factor"] = float(partial_rotary_factor)
    cache_name = "float32" if dtype is None else dtype_name(dtype)
    try:
        key = (head_size, rotary_dim, max_position, base, is_neox_style, _freeze(d), cache_name)
        hash(key)
    except TypeError:
        key = None
    if key is not None and key in _ROPE_CACHE:
        return _ROPE_CACHE[key]
    cls = MRotaryEmbedding if d.get("mrope_section") is not None else RotaryEmbedding
    rope = cls(head_size, rotary_dim, max_position, base, is_neox_style, dtype,
               rope_scaling=d if rope_scaling is not None or d else None)
    if key is not None:
        _ROPE_CACHE[key] = rope
    return rope


# ---------------------------------------------------------------------- HF configs

# Models whose RoPE pairs adjacent elements (GPT-J style) though their config says nothing
# (vLLM hard-codes is_neox_style=False in these model files).
_GPTJ_STYLE_MODELS = frozenset({"deepseek_v2", "deepseek_v3", "gptj"})


def rope_from_hf_config(config, dtype=None, max_position: int | None = None, *,
                        is_neox_style: bool | None = None, layer_type: str | None = None
                        ) -> RotaryEmbedding:
    """A :class:`RotaryEmbedding` from a HuggingFace config (a ``PretrainedConfig`` or its
    ``config.json`` as a dict), as transformers' rotary embedding of that model would be.

    Reads ``rope_parameters`` (transformers 5) or ``rope_scaling`` (4.x), ``rope_theta``
    (in the dict first), the head dim (``qk_rope_head_dim`` for MLA models, else
    ``head_dim``, else ``hidden_size // num_attention_heads``), ``partial_rotary_factor``
    (or GPT-J's ``rotary_dim``), ``max_position_embeddings`` (``max_position`` overrides
    it everywhere, as if the config said so) and, for llama3 / yarn / longrope,
    ``original_max_position_embeddings`` (the config's top-level value first, as
    transformers does for Phi-3; else max_position_embeddings). Multimodal configs with a
    ``text_config`` use it. ``is_neox_style`` None: False where the config says
    ``rope_interleave`` or the model is GPT-J style (DeepSeek-V2/V3, GPT-J), else True.
    ``layer_type``: picks one entry of per-layer-type ``rope_parameters`` (Gemma 3).
    """
    def get(cfg, name):
        if isinstance(cfg, Mapping):
            return cfg.get(name)
        return getattr(cfg, name, None)

    text = get(config, "text_config")
    if text is not None:  # multimodal: the language model's RoPE
        config = text
    params = get(config, "rope_parameters") or get(config, "rope_scaling")
    params: dict[str, Any] = dict(params) if params else {}
    if params and all(isinstance(v, Mapping) or v is None for v in params.values()):
        if layer_type is None:
            raise ValueError(f"layer_type: the config has per-layer-type rope_parameters "
                             f"{sorted(params)}; pick one")
        if params.get(layer_type) is None:
            raise ValueError(f"layer_type: {layer_type!r} not in rope_parameters {sorted(params)}")
        params = dict(params[layer_type])
    elif layer_type is not None:
        raise ValueError("layer_type: the config's rope_parameters are not per layer type")

    heads = get(config, "num_attention_heads") or get(config, "n_head")
    hidden = get(config, "hidden_size") or get(config, "n_embd")
    head_dim = get(config, "qk_rope_head_dim") or get(config, "head_dim")
    if not head_dim:
        if not (hidden and heads):
            raise ValueError("config: needs head_dim, or hidden_size and num_attention_heads")
        head_dim = hidden // heads
    if max_position is None:
        max_position = get(config, "max_position_embeddings") or get(config, "n_positions")
        if max_position is None:
            raise ValueError("max_position: the config has no max_position_embeddings; give it")

    if params.get("rope_theta") is None:
        theta = get(config, "rope_theta")
        params["rope_theta"] = 10000.0 if theta is None else theta
    if params.get("partial_rotary_factor") is None:
        prf = get(config, "partial_rotary_factor")
        if prf is None and get(config, "rotary_dim") is not None:  # GPT-J / CodeGen
            prf = get(config, "rotary_dim") / head_dim
        if prf is not None:
            params["partial_rotary_factor"] = prf
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in ("llama3", "yarn", "longrope", "deepseek_yarn", "su"):
        top = get(config, "original_max_position_embeddings")
        if top is not None:
            params["original_max_position_embeddings"] = top
        else:
            params.setdefault("original_max_position_embeddings", max_position)
    if is_neox_style is None:
        interleave = get(config, "rope_interleave")
        if interleave is not None:
            is_neox_style = not interleave
        else:
            is_neox_style = get(config, "model_type") not in _GPTJ_STYLE_MODELS
    return get_rope(int(head_dim), int(head_dim), int(max_position), None, is_neox_style,
                    params, dtype)
