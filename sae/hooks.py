"""
Named hook points on an unmodified nanochat model, TransformerLens style.

    blocks.{i}.hook_resid_pre    input of block i          (pre-hook on transformer.h[i])
    blocks.{i}.hook_attn_out     attention output          (hook on transformer.h[i].attn)
    blocks.{i}.hook_resid_mid    resid_pre + attn_out      (the two above, added)
    blocks.{i}.hook_mlp_post     relu^2 hidden layer (4C)  (pre-hook on transformer.h[i].mlp.c_proj)
    blocks.{i}.hook_mlp_out      MLP output                (hook on transformer.h[i].mlp)
    blocks.{i}.hook_resid_post   output of block i         (hook on transformer.h[i])

Each name captures its own tensor; none is an alias of another. The model's code is not
touched: everything goes through PyTorch module hooks, so the same names work on both
nanochat model classes (in 2026-format models resid_pre(i+1) is the *mixed* stream and
differs from resid_post(i)).

Two uses:
- `capture(model, names)`: read activations; the forward stops after the deepest block
  that any name needs, so later blocks and lm_head are never computed.
- `edit(model, name, fn)`: replace the tensor at a hook point by fn(tensor), inside the
  forward pass, so everything downstream (later blocks, mixing, backout) sees the edit.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

HOOK_KINDS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post",
              "hook_attn_out", "hook_mlp_out", "hook_mlp_post")
_NAME_RE = re.compile(r"^blocks\.(\d+)\.(hook_\w+)$")


@dataclass(frozen=True)
class HookPoint:
    layer: int
    kind: str

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.{self.kind}"


def hook_name(layer: int, kind: str = "hook_resid_post") -> str:
    kind = kind if kind.startswith("hook_") else f"hook_{kind}"
    return f"blocks.{layer}.{kind}"


def valid_hook_names(n_layer: int) -> list[str]:
    return [f"blocks.{i}.{k}" for i in range(n_layer) for k in HOOK_KINDS]


def parse_hook_name(name: str, n_layer: int) -> HookPoint:
    m = _NAME_RE.match(name)
    if not m or m.group(2) not in HOOK_KINDS:
        raise ValueError(f"unknown hook point {name!r}; valid names are blocks.<layer>.<kind> "
                         f"with layer 0..{n_layer - 1} and kind one of {', '.join(HOOK_KINDS)}")
    layer = int(m.group(1))
    if not 0 <= layer < n_layer:
        raise ValueError(f"hook point {name!r}: layer {layer} is out of range; this model has "
                         f"layers 0..{n_layer - 1}")
    return HookPoint(layer, m.group(2))


def deepest_layer(model, names: list[str]) -> int:
    return max(parse_hook_name(n, model.config.n_layer).layer for n in names)


@contextmanager
def capture(model, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """
    Within the context, every forward fills the yielded dict {name: tensor (B, T, d)}.
    Tensors are the model's own (no copy); read or clone them before the next forward.
    """
    points = [parse_hook_name(n, model.config.n_layer) for n in names]
    out: dict[str, torch.Tensor] = {}
    handles = []
    blocks = model.transformer.h
    for p in points:
        block = blocks[p.layer]
        if p.kind == "hook_resid_pre":
            handles.append(block.register_forward_pre_hook(_store_arg(out, p.name)))
        elif p.kind == "hook_resid_post":
            handles.append(block.register_forward_hook(_store_output(out, p.name)))
        elif p.kind == "hook_attn_out":
            handles.append(block.attn.register_forward_hook(_store_output(out, p.name)))
        elif p.kind == "hook_mlp_out":
            handles.append(block.mlp.register_forward_hook(_store_output(out, p.name)))
        elif p.kind == "hook_mlp_post":
            handles.append(block.mlp.c_proj.register_forward_pre_hook(_store_arg(out, p.name)))
        elif p.kind == "hook_resid_mid":
            pre_key = f"\0pre{p.layer}"
            handles.append(block.register_forward_pre_hook(_store_arg(out, pre_key)))
            handles.append(block.attn.register_forward_hook(_store_sum(out, p.name, pre_key)))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
        for k in [k for k in out if k.startswith("\0")]:
            del out[k]


def run_with_capture(model, idx: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """One forward, stopped after the deepest needed block; returns {name: (B, T, d)}."""
    with capture(model, names) as acts:
        model(idx, stop_after_layer=deepest_layer(model, names))
        return {n: acts[n] for n in names}


@contextmanager
def edit(model, name: str, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Within the context, the tensor at hook point `name` is replaced by fn(tensor)."""
    p = parse_hook_name(name, model.config.n_layer)
    block = model.transformer.h[p.layer]
    handles = []
    if p.kind == "hook_resid_pre":
        handles.append(block.register_forward_pre_hook(
            lambda mod, args: (fn(args[0]), *args[1:])))
    elif p.kind == "hook_resid_post":
        handles.append(block.register_forward_hook(lambda mod, args, out: fn(out)))
    elif p.kind == "hook_attn_out":
        handles.append(block.attn.register_forward_hook(lambda mod, args, out: fn(out)))
    elif p.kind == "hook_mlp_out":
        handles.append(block.mlp.register_forward_hook(lambda mod, args, out: fn(out)))
    elif p.kind == "hook_mlp_post":
        handles.append(block.mlp.c_proj.register_forward_pre_hook(
            lambda mod, args: (fn(args[0]), *args[1:])))
    elif p.kind == "hook_resid_mid":
        # resid_mid is not a module boundary: edit attn_out so that pre + attn_out' = fn(mid)
        saved = {}
        handles.append(block.register_forward_pre_hook(
            lambda mod, args: saved.__setitem__("pre", args[0])))
        handles.append(block.attn.register_forward_hook(
            lambda mod, args, out: _edit_mid(fn, saved["pre"], out)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _edit_mid(fn, pre, attn_out):
    mid = pre + attn_out
    new = fn(mid)
    # an fn that returns its input unchanged must leave the model bit-identical
    return attn_out if new is mid else new - pre


def _store_arg(out, key):
    def hook(module, args):
        out[key] = args[0]
    return hook


def _store_output(out, key):
    def hook(module, args, output):
        out[key] = output
    return hook


def _store_sum(out, key, pre_key):
    def hook(module, args, output):
        out[key] = out[pre_key] + output
    return hook
