"""What one RoPE call asks for, as one hashable value: ``RopeCall``.

The public functions build it once from their arguments (validating the plain-Python ones
here; arrays are validated by the planner) and pass it down unchanged: the router, the
torch custom ops, the launcher and the planner all read the same value. The torch op schema
is derived from ``OP_FIELDS`` below, so packing it into op arguments and unpacking it again
happen in one place (``to_op_args`` / ``from_op_args``), and the backward pass flips the
named field ``inverse``.

Builders are memoized (a warm call pays a dictionary look-up, not a validation) and marked
constant for torch.compile: Dynamo calls them at trace time on their constant arguments and
bakes the resulting value into the graph instead of tracing into them.
"""

from __future__ import annotations

import json
import operator
from typing import NamedTuple

import numpy as np

POSITIONS = "positions"  # one position per token (vLLM; FlashInfer's pos_ids)
INDPTR = "indptr"        # a ragged batch: indptr + offsets (FlashInfer)
# cos and sin given per token as two arrays, no positions: frequency j of a token at index j.
COS_SIN = "cos_sin"            # [tokens..., rotary_dim], halves repeated (transformers)
COS_SIN_HALF = "cos_sin_half"  # [tokens..., rotary_dim / 2] (flash-attn)
TOKEN_COS_SIN = (COS_SIN, COS_SIN_HALF)

_DEFAULT_THETA = 1e4     # FlashInfer's rope_theta default


class RopeCall(NamedTuple):
    """Everything a RoPE call asks for except its arrays.

    inplace: rotate query and key in place (returns None) or return new arrays (a
        separate torch op each, so not an op argument).
    head_size: elements per head; None: the last dim of query (FlashInfer's
        ``[nnz, num_heads, head_dim]`` layout).
    rotary_dim: rotated elements per head; None: the cache's width with a cache, the
        whole head on the fly.
    is_neox: NeoX pairs (i, i + R/2); False: GPT-J pairs (2i, 2i + 1).
    convention: POSITIONS (one per token), INDPTR (indptr + offsets), or COS_SIN /
        COS_SIN_HALF (per-token cos and sin arrays of width rotary_dim / rotary_dim/2).
    frequencies: None when cos/sin come from a cache or per-token arrays; else the
        on-the-fly frequencies as
        canonical JSON: ``{"rope_theta", "rope_scaling": HuggingFace-style dict, "names":
        {dict key: public argument name}}`` (``rope_jit.scaling.on_the_fly_values`` reads
        it; the names make its errors speak of ``rope_scale`` or ``old_context_len`` when
        those were the arguments).
    mrope_section: (t, h, w) frequency counts for multimodal RoPE (positions [3, tokens]).
    mrope_interleaved: Qwen3-VL's interleaved sections.
    inverse: rotate by the negative angle (the backward pass).
    check_positions: raise ValueError for positions outside the cache (one host sync).
    pdl: programmatic dependent launch (FlashInfer's enable_pdl): the kernel may start
        while the previous kernel on the stream finishes; it reads positions and the cache
        (or computes cos/sin) first and waits for that kernel before touching q and k, so
        the previous kernel must not write the positions or the cache. sm_90 and newer.
    rope_dim_offset: the rotated dims of each head are [offset, offset + rotary_dim)
        (vLLM's rope_dim_offset); in place only.
    heads_dim: the dim of query and key that holds the heads (transformers' unsqueeze_dim:
        1 for [batch, heads, seq, head_dim]); None: the dim before the last, or the last
        one packed as heads * head_size.
    out_neox: the pair order the outputs are written in; None: the input's (is_neox).
        ``is_neox=False, out_neox=True`` reads GPT-J pairs and writes them de-interleaved
        into NeoX order (DeepSeek's ``apply_rotary_pos_emb_interleave``). Out of place only.
    """

    inplace: bool
    head_size: int | None
    rotary_dim: int | None
    is_neox: bool
    convention: str = POSITIONS
    frequencies: str | None = None
    mrope_section: tuple | None = None
    mrope_interleaved: bool = False
    inverse: bool = False
    check_positions: bool = False
    pdl: bool = False
    rope_dim_offset: int = 0
    heads_dim: int | None = None
    out_neox: bool | None = None

    @property
    def from_cache(self) -> bool:
        """cos/sin read from a cache at each token's position."""
        return self.frequencies is None and self.convention not in TOKEN_COS_SIN

    @property
    def token_cos_sin(self) -> bool:
        """cos/sin given per token (no positions)."""
        return self.convention in TOKEN_COS_SIN

    def transpose(self) -> "RopeCall":
        """The call that applies the transpose of this call's linear map: the backward pass.
        The rotation by the negative angle, reading pairs in the order this call writes them
        and writing them in the order it reads them."""
        call = self._replace(inverse=not self.inverse, check_positions=False)
        if self.out_neox is not None and self.out_neox != self.is_neox:
            call = call._replace(is_neox=self.out_neox, out_neox=self.is_neox)
        return call

    def words(self) -> str:
        cs = ("cache" if self.from_cache else "cos/sin per token" if self.token_cos_sin
              else f"on the fly {self.frequencies}")
        order = ("" if self.out_neox in (None, self.is_neox)
                 else f" -> {'neox' if self.out_neox else 'gptj'} order")
        return (f"{'neox' if self.is_neox else 'gptj'}{order} {cs} {self.convention} "
                f"{'in place' if self.inplace else 'out of place'}"
                f"{' inverse' if self.inverse else ''}")


# The torch.library op arguments that carry a RopeCall: every field after ``inplace``
# (which picks the op instead), in order, with its schema type.
OP_FIELDS = (
    ("head_size", "int?"), ("rotary_dim", "int?"), ("is_neox", "bool"),
    ("convention", "str"), ("frequencies", "str?"), ("mrope_section", "int[]?"),
    ("mrope_interleaved", "bool"), ("inverse", "bool"), ("check_positions", "bool"),
    ("pdl", "bool"), ("rope_dim_offset", "int"),
    ("heads_dim", "int?"), ("out_neox", "bool?"),
)
assert tuple(n for n, _ in OP_FIELDS) == RopeCall._fields[1:], "OP_FIELDS must follow RopeCall"
OP_SCHEMA_ARGS = ", ".join(f"{t} {n}" for n, t in OP_FIELDS)
_MROPE = RopeCall._fields.index("mrope_section")


def to_op_args(call: RopeCall) -> tuple:
    """The op arguments of `call` (a slice of the tuple: trivial for Dynamo to trace)."""
    return call[1:]


def from_op_args(inplace: bool, args) -> RopeCall:
    """The RopeCall of an op's arguments (int[] arrives as a list)."""
    call = RopeCall(inplace, *args)
    section = call[_MROPE]
    return call if section is None or isinstance(section, tuple) else \
        call._replace(mrope_section=tuple(section))


# ------------------------------------------------------------------ argument checks

def check_int(value, name: str) -> int:
    """An integer (bool excluded): TypeError naming the argument otherwise."""
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an integer, got a bool")
    try:
        return int(operator.index(value))
    except TypeError:
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__} "
                        f"{value!r}") from None


def check_bool(value, name: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")


def _optional_int(value, name: str) -> int | None:
    return None if value is None else check_int(value, name)


def check_mrope_section(section) -> tuple:
    """mrope_section as a tuple of 3 non-negative ints (their sum is checked against the
    rotary dim by the planner)."""
    try:
        sec = tuple(section)
    except TypeError:
        raise TypeError(f"mrope_section: expected 3 integers (t, h, w), got {section!r}") from None
    if len(sec) != 3:
        raise ValueError(f"mrope_section: expected 3 integers (t, h, w), got {list(sec)}")
    sec = tuple(check_int(v, "mrope_section") for v in sec)
    if min(sec) < 0:
        raise ValueError(f"mrope_section: expected non-negative counts, got {list(sec)}")
    return sec


_MEMO_SIZE = 512


def _constant_for_dynamo(fn):
    """What ``torch.compiler.assume_constant_result`` does (it sets this one attribute),
    without importing torch: under torch.compile, Dynamo calls `fn` at trace time on its
    constant arguments and bakes the result into the graph instead of tracing into it.
    Valid because the result depends on the arguments only."""
    fn._dynamo_marked_constant = True
    return fn


def memoized_constant(fn):
    """`fn` memoized on its positional arguments and their exact types (Python's equality
    makes 64.0 == 64 and 1 == True: a float or bool argument must not find the entry of a
    valid int one and skip its TypeError), in a bounded dict, and marked constant for
    Dynamo (``_constant_for_dynamo``). For builders off the plain-RoPE hot path; the
    plain builders below inline a cheaper exact-type test."""
    memo = {}

    def memoized(*args):
        key = (args, tuple(map(type, args)))
        try:
            return memo[key]
        except KeyError:
            return _remember(memo, key, fn(*args))

    memoized.__doc__, memoized.__name__ = fn.__doc__, fn.__name__
    memoized.cache_clear = memo.clear
    return _constant_for_dynamo(memoized)


def _remember(memo: dict, key, value):
    if len(memo) >= _MEMO_SIZE:  # bounded: emptied when full
        memo.clear()
    memo[key] = value
    return value


def _section_is_exact(section) -> bool:
    return section is None or (type(section) is tuple and all(type(n) is int for n in section))


# Builders: validated once per distinct arguments, then a dict look-up. The look-up is
# taken only when every argument has exactly the type the call stores: Python's equality
# makes 64.0 == 64 and 1 == True, so a float head size or an int style would otherwise
# find the entry of a valid call and skip its TypeError.

_cache_calls: dict = {}
_plain_cache_calls: dict = {}


@_constant_for_dynamo
def plain_cache_call(head_size, is_neox, inplace: bool, check_positions=False) -> RopeCall:
    """``cache_call`` of the common case (no mRoPE, no inverse, no PDL): fewer arguments
    to check on the warm path of vLLM's and FlashInfer's cache functions."""
    key = (head_size, is_neox, inplace, check_positions)
    if type(head_size) is int and type(is_neox) is bool and type(check_positions) is bool:
        call = _plain_cache_calls.get(key)
        if call is not None:
            return call
    return _remember(_plain_cache_calls, key, cache_call(head_size, is_neox, inplace,
                                                         check_positions))


@_constant_for_dynamo
def cache_call(head_size, is_neox, inplace: bool, check_positions=False, mrope_section=None,
               mrope_interleaved=False, rotary_dim=None, inverse=False,
               pdl=False) -> RopeCall:
    """A call whose cos/sin come from a cos/sin cache (vLLM's convention: positions)."""
    key = (head_size, is_neox, inplace, check_positions, mrope_section, mrope_interleaved,
           rotary_dim, inverse, pdl)
    if (type(head_size) is int and type(is_neox) is bool and type(check_positions) is bool
            and (rotary_dim is None or type(rotary_dim) is int) and type(inverse) is bool
            and type(mrope_interleaved) is bool and _section_is_exact(mrope_section)
            and type(pdl) is bool):
        call = _cache_calls.get(key)
        if call is not None:
            return call
    head_size = check_int(head_size, "head_size")
    if head_size <= 0:
        raise ValueError(f"head_size: expected a positive integer, got {head_size}")
    return _remember(_cache_calls, key, RopeCall(
        inplace, head_size, _optional_int(rotary_dim, "rotary_dim"),
        check_bool(is_neox, "is_neox"), POSITIONS, None,
        None if mrope_section is None else check_mrope_section(mrope_section),
        check_bool(mrope_interleaved, "mrope_interleaved"), check_bool(inverse, "inverse"),
        check_bool(check_positions, "check_positions"), check_bool(pdl, "enable_pdl")))


_fly_calls: dict = {}


@_constant_for_dynamo
def on_the_fly_call(convention: str, rotary_dim, interleave, inplace: bool,
                    frequencies: str, mrope_section=None, mrope_interleaved=False,
                    pdl=False) -> RopeCall:
    """A call whose cos/sin are computed in the kernel (FlashInfer's convention: the head
    size is the last dim of q). `frequencies` from ``frequencies_json``."""
    key = (convention, rotary_dim, interleave, inplace, frequencies, mrope_section,
           mrope_interleaved, pdl)
    if ((rotary_dim is None or type(rotary_dim) is int) and type(interleave) is bool
            and type(mrope_interleaved) is bool and _section_is_exact(mrope_section)
            and type(pdl) is bool):
        call = _fly_calls.get(key)
        if call is not None:
            return call
    return _remember(_fly_calls, key, RopeCall(
        inplace, None, _optional_int(rotary_dim, "rotary_dim"),
        not check_bool(interleave, "interleave"), convention, frequencies,
        None if mrope_section is None else check_mrope_section(mrope_section),
        check_bool(mrope_interleaved, "mrope_interleaved"), pdl=check_bool(pdl, "enable_pdl")))


@_constant_for_dynamo
def with_rope_dim_offset(call: RopeCall, rope_dim_offset) -> RopeCall:
    """`call` rotating the dims after `rope_dim_offset` of each head (vLLM's argument)."""
    offset = check_int(rope_dim_offset, "rope_dim_offset")
    if offset < 0:
        raise ValueError(f"rope_dim_offset: expected a non-negative integer, got {offset}")
    if not call.inplace:
        raise ValueError("rope_dim_offset: supported in place only (vLLM's rotary_embedding); "
                         "use a view of the heads for an out-of-place call")
    return call._replace(rope_dim_offset=offset)


def _jsonable(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if isinstance(v, (tuple, np.ndarray)):
        return list(v)
    return repr(v)  # not a JSON value: kept visible, the variant's checks refuse it


_frequencies: dict = {}
_plain_frequencies: dict = {}   # (rope_theta, rope_scale) of FlashInfer's plain functions
_NUMBER = (float, int)


def _frequencies_from_items(rope_theta, items, names) -> str:
    key = (rope_theta, items, names)
    # the look-up only for exact numbers (a bool theta would find the entry of theta 1)
    exact = type(rope_theta) is float or type(rope_theta) is int
    got = _frequencies.get(key) if exact else None
    if got is None:
        got = _remember(_frequencies, key, _encode_frequencies(rope_theta, dict(items), dict(names)))
    return got


def _encode_frequencies(rope_theta, rope_scaling: dict, names: dict) -> str:
    if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float, np.floating)):
        raise ValueError(f"rope_theta: expected a finite number > 0 and != 1, got {rope_theta!r}")
    theta = float(rope_theta)
    if rope_scaling.get("rope_theta") is not None:
        if theta != _DEFAULT_THETA and rope_scaling["rope_theta"] != theta:
            raise ValueError(f"rope_theta: {rope_theta!r} differs from "
                             f"rope_scaling['rope_theta'] = {rope_scaling['rope_theta']!r}; "
                             "give one of them")
        theta_value = rope_scaling["rope_theta"]  # the dict wins over FlashInfer's default
    else:
        theta_value = theta
    rope_scaling = {k: v for k, v in rope_scaling.items() if k != "rope_theta"}
    return json.dumps({"rope_theta": theta_value, "rope_scaling": rope_scaling, "names": names},
                      sort_keys=True, default=_jsonable)


@_constant_for_dynamo
def frequencies_json(rope_theta=_DEFAULT_THETA, rope_scale=1.0, rope_scaling=None,
                     llama31=None) -> str:
    """The ``frequencies`` of an on-the-fly call from FlashInfer's arguments.

    rope_scale (FlashInfer: divides the frequencies) is the factor of linear scaling;
    llama31 = (low_freq_factor, high_freq_factor, old_context_len) makes it the factor of
    Llama 3.1's smoothing; rope_scaling is a HuggingFace-style dict (then rope_scale must
    be 1: the dict's factor scales). Errors name the argument the user gave.
    """
    if rope_scaling is not None:
        if not (isinstance(rope_scale, (int, float)) and rope_scale == 1.0):
            raise ValueError(f"rope_scale: must be 1.0 when rope_scaling is given (its factor "
                             f"scales the frequencies), got {rope_scale!r}")
        if not hasattr(rope_scaling, "items"):
            raise ValueError(f"rope_scaling: expected a dict, got {type(rope_scaling).__name__}")
        try:
            items = tuple(sorted(rope_scaling.items()))
            hash(items)
        except TypeError:  # lists inside (mrope_section, long_factor): not memoizable
            return _encode_frequencies(rope_theta, dict(rope_scaling), {})
        return _frequencies_from_items(rope_theta, items, ())
    if llama31 is not None:
        low, high, old_context_len = llama31
        items = (("factor", rope_scale), ("high_freq_factor", high), ("low_freq_factor", low),
                 ("original_max_position_embeddings", old_context_len), ("rope_type", "llama3"))
        names = (("factor", "rope_scale"), ("high_freq_factor", "high_freq_factor"),
                 ("low_freq_factor", "low_freq_factor"),
                 ("original_max_position_embeddings", "old_context_len"))
        return _frequencies_from_items(rope_theta, items, names)
    key = (rope_theta, rope_scale)
    if type(rope_theta) in _NUMBER and type(rope_scale) in _NUMBER:  # not bool: True == 1
        got = _plain_frequencies.get(key)
        if got is not None:
            return got
    if type(rope_scale) is bool:
        raise ValueError(f"rope_scale: expected a finite number > 0, got {rope_scale!r}")
    return _remember(_plain_frequencies, key, _frequencies_from_items(
        rope_theta, (("factor", rope_scale), ("rope_type", "linear")), (("factor", "rope_scale"),)))


_token_calls: dict = {}


@_constant_for_dynamo
def token_cos_sin_call(convention: str, is_neox, inplace: bool, heads_dim=None,
                       out_neox=None) -> RopeCall:
    """A call whose cos/sin arrive per token (transformers' and flash-attn's convention:
    no positions; the head size is the last dim of q, the rotary dim the cos/sin width)."""
    key = (convention, is_neox, inplace, heads_dim, out_neox)
    if (type(is_neox) is bool and (heads_dim is None or type(heads_dim) is int)
            and (out_neox is None or type(out_neox) is bool)):
        call = _token_calls.get(key)
        if call is not None:
            return call
    if convention not in TOKEN_COS_SIN:
        raise ValueError(f"convention: expected one of {TOKEN_COS_SIN}, got {convention!r}")
    return _remember(_token_calls, key, RopeCall(
        inplace, None, None, check_bool(is_neox, "is_neox"), convention,
        heads_dim=_optional_int(heads_dim, "unsqueeze_dim"),
        out_neox=None if out_neox is None else check_bool(out_neox, "out_neox")))


def clear_call_caches() -> None:
    for memo in (_cache_calls, _fly_calls, _token_calls, _frequencies):
        memo.clear()
