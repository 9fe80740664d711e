"""Name tables: the one loop that renames a released checkpoint's keys by a table of patterns, and the checks
that make a conversion complete or nothing (every key placed or deliberately dropped, every shape right).
The tables themselves are data in `hubert`, `openai_clip` and `heads`."""

from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping, NamedTuple

import torch
from torch import Tensor, nn

from .errors import ConversionError


class Rule(NamedTuple):
    """One fairseq/OpenAI -> HF name pattern: `pattern` fully matches the key after the prefix; `target` is
    its `re` expansion; `op` says how the tensor changes (`OPS`)."""

    pattern: str
    target: str
    op: str = "copy"


OPS: dict[str, Callable[[str, Tensor], list[tuple[str, Tensor]]]] = {
    "copy": lambda target, t: [(target, t)],
    "transpose": lambda target, t: [(target, t.t().contiguous())],
    # in_proj (3D, ...) -> q, k, v; cloned so that no two saved tensors share storage.
    "split_qkv": lambda target, t: [(target.format(n), p.clone()) for n, p in zip("qkv", t.chunk(3, dim=0))],
}


def apply_name_table(state: Mapping[str, Tensor], prefix: str, rules: Iterable[Rule], dropped: Iterable[str],
                     source: str) -> tuple[dict[str, Tensor], dict[str, str], set[str]]:
    """Rename every key under `prefix` by the first rule that fully matches it.

    Returns the renamed float32 tensors, for each new name the source key it came from (for messages), and
    the consumed source keys (mapped or dropped). A key no rule or drop pattern matches raises."""
    rules, dropped = tuple(rules), tuple(dropped)
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    consumed: set[str] = set()
    for key, tensor in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        consumed.add(key)
        if any(re.fullmatch(pattern, name) for pattern in dropped):
            continue
        match = next(((rule, m) for rule in rules if (m := re.fullmatch(rule.pattern, name))), None)
        if match is None:
            raise ConversionError(f"{source}: {key}: no conversion rule for this key (unknown layout)")
        rule, found = match
        # fp16 copies (OpenAI's clip.load on GPU) become float32 like the hub's folders; exact.
        value = tensor.float() if tensor.is_floating_point() and tensor.dtype != torch.float32 else tensor
        for target, converted in OPS[rule.op](found.expand(rule.target), value):
            out[target] = converted
            origin[target] = key
    return out, origin, consumed


def check_against_model(model: nn.Module, state: dict[str, Tensor], origin: dict[str, str], source: str) -> None:
    """Every tensor the model expects is present with its shape, then strict loading proves completeness.

    `model` is built on the meta device (no memory); loading assigns the given tensors without copying."""
    expected = model.state_dict()
    for name, tensor in state.items():
        if name not in expected:
            raise ConversionError(f"{source}: {origin[name]}: maps to {name}, which the model does not have")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ConversionError(f"{source}: {origin[name]}: shape {tuple(tensor.shape)}, the model expects "
                                  f"{tuple(expected[name].shape)} for {name}")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ConversionError(f"{source}: no source key provides {missing[0]} ({len(missing)} missing)")
    model.load_state_dict(state, strict=True, assign=True)


def layer_indices(state: Mapping[str, Tensor], pattern: str) -> list[int]:
    """Sorted distinct layer numbers N of the keys fully matching `pattern` (which captures N)."""
    return sorted({int(m.group(1)) for key in state if (m := re.fullmatch(pattern, key))})


def require_tensor(state: Mapping[str, Tensor], prefix: str, name: str, source: str) -> Tensor:
    """The tensor a config size is read from; its absence is named, not a KeyError."""
    if prefix + name not in state:
        raise ConversionError(f"{source}: {prefix}{name}: missing (needed to derive the model's shape)")
    return state[prefix + name]
