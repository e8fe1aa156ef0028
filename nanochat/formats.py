"""
Which nanochat format ("era") a checkpoint is, decided from its state-dict keys, shapes and meta.

nanochat's meta JSON does not record the rope base, QK scale, softcap, short-window size or
value-embedding gate range (nanochat_format.md §8), so the keys and shapes are the signal:

    era         dates                    signature (besides transformer.* and lm_head)
    oct2025     2025-10 .. 2025-12-22    nothing else; wte rows == vocab_size
    2025-12-23  2025-12-23 .. 2026-01-10 nothing else; wte rows == vocab_size padded to 64
    2026-01-11  2026-01-11 .. 2026-01-17 resid_lambdas, x0_lambdas
    2026-01-18  2026-01-18 .. 2026-03-01 + value_embeds.*, ve_gate (Hkv, 32)  } same keys:
    2026-03-02  2026-03-02 .. 2026-03-08 + value_embeds.*, ve_gate (Hkv, 32)  } softcap 15 vs 20
    2026-03-09  2026-03-09 .. 2026-03-13 + value_embeds.*, ve_gate (Hkv, 12)
    2026-03-14  2026-03-14 .. 2026-07-03 + ve_gate (Hkv, 12), smear_gate, smear_lambda,
                                           backout_lambda

Choices:
- an era whose numerics the keys determine is loaded; a key set that matches no era, or
  matches several eras with different numerics, is refused with what was found
- the two eras with identical keys (2026-01-18 / 2026-03-02, softcap 15 vs 20) load only
  when the meta says which: `"nanochat_era": "<name>"` in meta_<step>.json. Checkpoints
  written by this project always say it; a declared era must agree with the keys
- oct2025 loads into the Oct-2025 `GPT` (bit-exact as before); every later era into `GPT2026`
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nanochat.gpt import GPT, GPTConfig
from nanochat.gpt2026 import SMEAR_CHANNELS, GPT2026, GPT2026Config

OCT_2025 = "oct2025"
ERA_META_KEY = "nanochat_era"
VOCAB_PAD = 64  # nanochat pads wte/lm_head rows to a multiple of 64 from 2025-12-23


class UnsupportedFormatError(ValueError):
    """A checkpoint whose nanochat format is unknown or ambiguous, so its numerics are not known."""


@dataclass(frozen=True)
class Era:
    name: str
    dates: str
    lambdas: bool = False           # resid_lambdas / x0_lambdas
    ve_gate_channels: int = 0       # 0: no value embeddings
    ve_gate_range: float = 2.0
    smear_backout: bool = False
    rope_base: float = 10000.0
    qk_scale: float = 1.0
    softcap: float = 15.0
    short_window_div: int = 2       # "S" window = sequence_len / div ...
    short_window_tile: int = 1      # ... rounded up to a multiple of this
    rotary_bf16: bool = True

    @property
    def model_class(self) -> type:
        return GPT if self.name == OCT_2025 else GPT2026

    def short_window(self, sequence_len: int) -> int:
        if self.short_window_tile == 1:
            return sequence_len // self.short_window_div
        per = -(-sequence_len // self.short_window_div)
        return -(-per // self.short_window_tile) * self.short_window_tile

    def config(self, model_config: dict) -> GPTConfig | GPT2026Config:
        """The model config for a checkpoint of this era, from its meta `model_config`."""
        if self.name == OCT_2025:
            return GPTConfig.from_dict(model_config)
        ints = ["sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"]
        missing = [k for k in ints if k not in model_config]
        if missing:
            raise KeyError(f"model_config is missing {missing}")
        c = {k: int(model_config[k]) for k in ints}
        return GPT2026Config(
            **c, window_pattern=str(model_config.get("window_pattern", "L")),
            padded_vocab_size=padded_vocab(c["vocab_size"]), has_lambdas=self.lambdas,
            ve_gate_channels=self.ve_gate_channels, ve_gate_range=self.ve_gate_range,
            has_smear=self.smear_backout, has_backout=self.smear_backout,
            rope_base=self.rope_base, qk_scale=self.qk_scale, softcap=self.softcap,
            short_window=self.short_window(c["sequence_len"]), rotary_bf16=self.rotary_bf16,
            era=self.name)


ERAS = {e.name: e for e in [
    Era(OCT_2025, "2025-10 .. 2025-12-22"),
    Era("2025-12-23", "2025-12-23 .. 2026-01-10"),
    Era("2026-01-11", "2026-01-11 .. 2026-01-17", lambdas=True),
    Era("2026-01-18", "2026-01-18 .. 2026-03-01", lambdas=True, ve_gate_channels=32),
    # softcap 20; tables in the compute dtype from 2026-03-04 (fp32 on CPU; the two days
    # before stored them in bf16, a rounding-level difference)
    Era("2026-03-02", "2026-03-02 .. 2026-03-08", lambdas=True, ve_gate_channels=32,
        softcap=20.0, rotary_bf16=False),
    Era("2026-03-09", "2026-03-09 .. 2026-03-13", lambdas=True, ve_gate_channels=12,
        ve_gate_range=3.0, rope_base=100000.0, qk_scale=1.15, short_window_div=3,
        short_window_tile=128, rotary_bf16=False),
    Era("2026-03-14", "2026-03-14 .. 2026-07-03 (HEAD)", lambdas=True, ve_gate_channels=12,
        ve_gate_range=3.0, smear_backout=True, rope_base=100000.0, qk_scale=1.2,
        short_window_div=4, short_window_tile=128, rotary_bf16=False),
]}


def padded_vocab(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_PAD) * VOCAB_PAD


_BLOCK_KEY = re.compile(
    r"^transformer\.h\.(\d+)\.(attn\.c_[qkv]|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_VE_GATE_KEY = re.compile(r"^transformer\.h\.(\d+)\.attn\.ve_gate\.weight$")
_VE_KEY = re.compile(r"^value_embeds\.(\d+)\.weight$")
_PLAIN_KEYS = {"transformer.wte.weight", "lm_head.weight", "resid_lambdas", "x0_lambdas",
               "smear_gate.weight", "smear_lambda", "backout_lambda"}


def detect_era(state_dict: dict, meta: dict, where: str = "checkpoint") -> Era:
    """The era of a checkpoint (keys without `_orig_mod.`); UnsupportedFormatError if none fits."""
    mc = meta.get("model_config", {})
    for k in ("vocab_size", "n_layer"):
        if k not in mc:
            raise KeyError(f"{where}: model_config is missing {k!r}")
    V, L = int(mc["vocab_size"]), int(mc["n_layer"])
    keys = set(state_dict)

    unknown = sorted(k for k in keys if k not in _PLAIN_KEYS
                     and not (_BLOCK_KEY.match(k) or _VE_GATE_KEY.match(k) or _VE_KEY.match(k)))
    found = _summary(state_dict, mc)
    if unknown:
        _refuse(where, f"keys that no nanochat format has: {_short(unknown)}", found)

    # the state-dict features, each all-or-nothing
    lambdas = _all_or_none(keys, ["resid_lambdas", "x0_lambdas"], where, found)
    smear = _all_or_none(keys, ["smear_gate.weight", "smear_lambda", "backout_lambda"], where,
                         found)
    ve_layers = sorted(int(m.group(1)) for k in keys if (m := _VE_KEY.match(k)))
    gate_layers = sorted(int(m.group(1)) for k in keys if (m := _VE_GATE_KEY.match(k)))
    gate_widths = sorted({state_dict[f"transformer.h.{i}.attn.ve_gate.weight"].shape[-1]
                          for i in gate_layers})
    if ve_layers or gate_layers:
        rule = [i for i in range(L) if i % 2 == (L - 1) % 2]
        if ve_layers != rule or gate_layers != rule:
            _refuse(where, f"value embeddings on layers {ve_layers} and ve_gate on layers "
                           f"{gate_layers}; nanochat puts both on layers {rule}", found)
        if len(gate_widths) != 1 or gate_widths[0] not in (32, 12):
            _refuse(where, f"ve_gate input width {gate_widths}; nanochat used 32, later 12", found)
    if smear and state_dict["smear_gate.weight"].shape[-1] != SMEAR_CHANNELS:
        _refuse(where, f"smear_gate reads {state_dict['smear_gate.weight'].shape[-1]} channels; "
                       f"nanochat's reads {SMEAR_CHANNELS}", found)
    ve_width = gate_widths[0] if gate_layers else 0
    window = mc.get("window_pattern", "L")
    if not isinstance(window, str) or not window or set(window.upper()) - {"S", "L"}:
        _refuse(where, f"window_pattern {window!r} is not a string of S and L", found)

    # which eras have exactly these features
    candidates = [e for e in ERAS.values()
                  if e.lambdas == lambdas and e.smear_backout == smear
                  and e.ve_gate_channels == ve_width]
    wte = state_dict.get("transformer.wte.weight")
    rows = wte.shape[0] if wte is not None else None
    if not lambdas:
        if window.upper().strip("L"):
            _refuse(where, f"window_pattern={window!r} without resid_lambdas/x0_lambdas; sliding "
                           f"windows arrived with them (2026-01-11)", found)
        candidates = [e for e in candidates if (e.name == OCT_2025) == (rows == V)]
    elif rows is not None and rows != padded_vocab(V):
        _refuse(where, f"transformer.wte.weight has {rows} rows; formats with resid_lambdas pad "
                       f"the vocab ({V}) to {padded_vocab(V)}", found)
    if not candidates:
        _refuse(where, "this combination matches no nanochat format", found)

    declared = meta.get(ERA_META_KEY)
    if declared is not None:
        match = [e for e in candidates if e.name == declared]
        if not match:
            raise UnsupportedFormatError(
                f"{where}: meta declares {ERA_META_KEY}={declared!r}, but the keys fit "
                f"{[e.name for e in candidates]}; found: {found}")
        return match[0]
    if len(candidates) > 1:
        options = "; ".join(f"{e.name!r} ({e.dates}, softcap {e.softcap:g})" for e in candidates)
        raise UnsupportedFormatError(
            f"{where}: ambiguous nanochat format; found: {found}. These keys fit several "
            f"formats whose numerics differ and nanochat's meta does not say which: {options}. "
            f"If you know when it was trained, add \"{ERA_META_KEY}\": \"<name>\" to its meta JSON")
    return candidates[0]


def _all_or_none(keys: set, names: list[str], where: str, found: str) -> bool:
    present = [n for n in names if n in keys]
    if present and len(present) != len(names):
        _refuse(where, f"{present} without {[n for n in names if n not in keys]}; nanochat "
                       f"formats have all of {names} or none", found)
    return bool(present)


def _summary(state_dict: dict, mc: dict) -> str:
    """What a refusal reports: the keys beyond the six block weights, with shapes."""
    def shape(k):
        return tuple(getattr(state_dict[k], "shape", ()))
    parts = [f"{k} {shape(k)}" for k in sorted(state_dict) if k in _PLAIN_KEYS]
    for rx, what in ((_VE_KEY, "value_embeds"), (_VE_GATE_KEY, "attn.ve_gate")):
        layers = sorted((int(m.group(1)), k) for k in state_dict if (m := rx.match(k)))
        if layers:
            parts.append(f"{what} on layers {[i for i, _ in layers]} {shape(layers[0][1])}")
    n_blocks = len({m.group(1) for k in state_dict if (m := _BLOCK_KEY.match(k))})
    parts.append(f"{n_blocks} blocks")
    parts.append(f"vocab_size={mc.get('vocab_size')}")
    parts.append(f"window_pattern={mc.get('window_pattern', '(absent)')!r}")
    return ", ".join(parts)


def _short(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _refuse(where: str, why: str, found: str):
    raise UnsupportedFormatError(f"{where}: unknown nanochat format: {why}; found: {found}")
