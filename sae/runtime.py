"""
Trained SAEs attached to a live model: read features while it runs, and steer it.

    rt = SAERuntime(model, {"blocks.2.hook_resid_post": sae})
    rt.track()                                   # top features of every token, every attached SAE
    rt.add(steer("blocks.2.hook_resid_post", feature=123, strength=8.0, start_pos=5))
    tokens = list(generate(model, prompt, 32, forward_last=True))
    per_token = rt.token_features()              # one TokenFeatures per prompt + generated token
    rt.detach()                                  # no hooks left: the model is exactly as before

Interventions, each at its SAE's hook point (all through `sae.hooks.edit`, in the order added):
- steer:  x += α·d_f/‖d_f‖                  add the feature's unit decoder direction
- clamp:  x += (v - a_f(x))·d_f             set the feature's activation to v, leaving the SAE's
                                            reconstruction of every other feature untouched
- ablate: clamp to 0                        remove the feature's contribution
where d_f = decode(e_f) - decode(0) is the feature's decoder row in raw activation units and a_f
is the SAE's own encoding of the current x. The residual is never replaced by the SAE
reconstruction, so the SAE's error term stays in the stream and a no-op edit is exactly a no-op.

Notable choices
- Absolute positions under a KV cache come from a forward pre-hook on the model itself, which
  reads `kv_cache.get_pos()` as each chunk starts; so `start_pos` means the same thing in one
  full forward and in prefill + decode, and the two paths agree token for token.
- A forward that starts at position 0 begins a new trace: after a generation, the trace holds
  exactly that sequence (prompt first).
- Tracking reads the hook point *after* the interventions there, so a steered run reports what
  the SAE sees on the steered residual. Top features are kept on the model's device and copied
  to the CPU only when read, so decoding never waits on a device sync.
- SAE math runs in fp32 with autocast off, whatever the model's compute dtype; the edit is cast
  back to the residual's dtype.
- Labels are a plain {sae_id: {feature: label}} mapping; reading them from a feature store is
  the caller's job (this package knows nothing of DuckDB).
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch

from sae.hooks import edit, parse_hook_name

INTERVENTION_KINDS = ("steer", "clamp")


@dataclass(frozen=True, eq=False)
class Intervention:
    """One edit at an SAE's hook point. `value` is α for steer, the target activation for clamp."""
    kind: str
    sae_id: str
    feature: int
    value: float
    start_pos: int = 0  # first absolute position (BOS = 0) the edit applies to


def steer(sae_id: str, feature: int, strength: float, start_pos: int = 0) -> Intervention:
    return Intervention("steer", sae_id, int(feature), float(strength), int(start_pos))


def clamp(sae_id: str, feature: int, value: float, start_pos: int = 0) -> Intervention:
    return Intervention("clamp", sae_id, int(feature), float(value), int(start_pos))


def ablate(sae_id: str, feature: int, start_pos: int = 0) -> Intervention:
    return clamp(sae_id, feature, 0.0, start_pos)


@dataclass(frozen=True)
class FeatureHit:
    feature: int
    activation: float
    label: str | None = None


@dataclass
class TokenFeatures:
    position: int
    features: dict[str, list[FeatureHit]]  # sae_id -> active features, strongest first


@dataclass
class _Tracking:
    top_n: int
    watch: torch.Tensor  # feature ids whose activation is recorded at every position
    chunks: list = field(default_factory=list)  # (t0, values [B,T,n], ids [B,T,n], watched [B,T,w])
    active: bool = True  # False once detached: the trace stays readable, nothing more is recorded


class SAERuntime:
    """
    SAEs attached to `model` by id (default: each SAE's cfg.hook_name). SAEs are moved to the
    model's device and put in eval mode. Nothing is hooked until `track` or `add` is called, and
    `detach` (or leaving a `with` block) removes every hook.
    """

    def __init__(self, model, saes: Mapping[str, torch.nn.Module] | Sequence[torch.nn.Module],
                 labels: Mapping[str, Mapping[int, str]] | None = None):
        self.model = model
        self.saes = _by_id(saes)
        self.labels = {k: dict(v) for k, v in (labels or {}).items()}
        unknown = sorted(set(self.labels) - set(self.saes))
        if unknown:
            raise KeyError(f"labels given for SAEs that are not attached: {unknown}")
        n_embd = model.config.n_embd
        device = model.get_device()
        for sae_id, sae in self.saes.items():
            point = parse_hook_name(sae.cfg.hook_name, model.config.n_layer)
            width = 4 * n_embd if point.kind == "hook_mlp_post" else n_embd
            if sae.cfg.d_in != width:
                raise ValueError(f"SAE {sae_id!r}: d_in={sae.cfg.d_in} but {sae.cfg.hook_name} has "
                                 f"width {width} in this model")
            sae.to(device).eval()
        self._kv_arg = _kv_cache_index(model)
        self._t0 = 0
        self._tracking: dict[str, _Tracking] = {}
        self._interventions: list[tuple[Intervention, torch.Tensor]] = []
        self._edits: dict[str, ExitStack] = {}  # hook name -> its registered edit
        self._position_hook = None

    # ---- tracking ----

    def track(self, sae_ids: str | Iterable[str] | None = None, top_n: int = 8,
              watch: Iterable[int] = ()) -> None:
        """Record the top_n active features of every token (and the activations of `watch`)."""
        if top_n < 1:
            raise ValueError(f"top_n must be >= 1, got {top_n}")
        watch = list(watch)
        for sae_id in self._ids(sae_ids):
            sae = self.saes[sae_id]
            ids = [self._check_feature(sae_id, f) for f in watch]
            self._tracking[sae_id] = _Tracking(
                min(top_n, sae.cfg.d_sae),
                torch.tensor(ids, dtype=torch.long, device=sae.W_dec.device))
        self._sync_hooks()

    def untrack(self, sae_ids: str | Iterable[str] | None = None) -> None:
        """Stop recording (and forget the traces of) these SAEs."""
        for sae_id in self._ids(sae_ids):
            self._tracking.pop(sae_id, None)
        self._sync_hooks()

    def reset_trace(self) -> None:
        for t in self._tracking.values():
            t.chunks.clear()

    def token_features(self, row: int = 0) -> list[TokenFeatures]:
        """Per traced position, in order: the active features of every tracked SAE."""
        per_sae = {sae_id: self._trace(sae_id, row) for sae_id in self._tracking}
        positions = sorted({p for pos, _, _, _ in per_sae.values() for p in pos.tolist()})
        out = {p: TokenFeatures(p, {}) for p in positions}
        for sae_id, (pos, values, ids, _) in per_sae.items():
            labels = self.labels.get(sae_id, {})
            for p, vals, feats in zip(pos.tolist(), values.tolist(), ids.tolist()):
                out[p].features[sae_id] = [FeatureHit(f, v, labels.get(f))
                                           for v, f in zip(vals, feats) if v > 0]
        return [out[p] for p in positions]

    def watched(self, sae_id: str, row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions [N], activations [N, len(watch)]) of the features passed as `watch`."""
        if sae_id not in self._tracking:
            raise KeyError(f"SAE {sae_id!r} is not tracked")
        pos, _, _, watched = self._trace(sae_id, row)
        return pos, watched

    # ---- interventions ----

    def add(self, intervention: Intervention) -> Intervention:
        """Apply an intervention from the next forward on; returns it (the handle for `remove`)."""
        iv = intervention
        if iv.kind not in INTERVENTION_KINDS:
            raise ValueError(f"unknown intervention kind {iv.kind!r}; expected {INTERVENTION_KINDS}")
        if iv.sae_id not in self.saes:
            raise KeyError(f"no attached SAE {iv.sae_id!r}; attached: {sorted(self.saes)}")
        if iv.start_pos < 0:
            raise ValueError(f"start_pos must be >= 0, got {iv.start_pos}")
        self._check_feature(iv.sae_id, iv.feature)
        direction = decoder_direction(self.saes[iv.sae_id], iv.feature)
        if iv.kind == "steer":
            direction = iv.value * direction / direction.norm().clamp_min(1e-12)
        self._interventions.append((iv, direction))
        self._sync_hooks()
        return iv

    def remove(self, intervention: Intervention) -> None:
        kept = [(iv, d) for iv, d in self._interventions if iv is not intervention]
        if len(kept) == len(self._interventions):
            raise KeyError(f"intervention {intervention} is not active")
        self._interventions = kept
        self._sync_hooks()

    def clear_interventions(self) -> None:
        self._interventions = []
        self._sync_hooks()

    @property
    def interventions(self) -> tuple[Intervention, ...]:
        return tuple(iv for iv, _ in self._interventions)

    # ---- lifetime ----

    def detach(self) -> None:
        """Remove every hook (tracking and interventions); traces already recorded stay readable."""
        self._interventions = []
        for tracking in self._tracking.values():
            tracking.active = False
        self._sync_hooks()

    def __enter__(self) -> "SAERuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # ---- the hooks ----

    def _sync_hooks(self) -> None:
        """Register one edit per hook point in use; unregister points no longer used."""
        needed = {self.saes[s].cfg.hook_name for s, t in self._tracking.items() if t.active}
        needed |= {self.saes[iv.sae_id].cfg.hook_name for iv, _ in self._interventions}
        for name in list(self._edits):
            if name not in needed:
                self._edits.pop(name).close()
        for name in sorted(needed - set(self._edits)):
            stack = ExitStack()
            stack.enter_context(edit(self.model, name, self._edit_fn(name)))
            self._edits[name] = stack
        if self._edits and self._position_hook is None:
            self._position_hook = self.model.register_forward_pre_hook(self._on_forward,
                                                                       with_kwargs=True)
        elif not self._edits and self._position_hook is not None:
            self._position_hook.remove()
            self._position_hook = None

    def _on_forward(self, module, args, kwargs) -> None:
        kv_cache = kwargs.get("kv_cache") if "kv_cache" in kwargs else (
            args[self._kv_arg] if len(args) > self._kv_arg else None)
        self._t0 = kv_cache.get_pos() if kv_cache is not None else 0
        if self._t0 == 0:
            self.reset_trace()

    def _edit_fn(self, name: str):
        def fn(x: torch.Tensor) -> torch.Tensor:
            t0 = self._t0
            with torch.autocast(x.device.type, enabled=False):
                for iv, direction in self._interventions:
                    sae = self.saes[iv.sae_id]
                    if sae.cfg.hook_name == name:
                        x = _apply(x, iv, sae, direction, t0)
                for sae_id, tracking in self._tracking.items():
                    sae = self.saes[sae_id]
                    if tracking.active and sae.cfg.hook_name == name:
                        _record(x, sae, tracking, t0)
            return x
        return fn

    # ---- helpers ----

    def _trace(self, sae_id: str, row: int):
        chunks = self._tracking[sae_id].chunks
        if not chunks:
            empty = torch.zeros(0, dtype=torch.long)
            n, w = self._tracking[sae_id].top_n, self._tracking[sae_id].watch.numel()
            return empty, torch.zeros(0, n), torch.zeros(0, n, dtype=torch.long), torch.zeros(0, w)
        pos = torch.cat([torch.arange(t0, t0 + v.shape[1]) for t0, v, _, _ in chunks])
        values = torch.cat([v[row] for _, v, _, _ in chunks]).cpu()
        ids = torch.cat([i[row] for _, _, i, _ in chunks]).cpu()
        watched = torch.cat([w[row] for _, _, _, w in chunks]).cpu()
        return pos, values, ids, watched

    def _ids(self, sae_ids) -> list[str]:
        if sae_ids is None:
            return list(self.saes)
        ids = [sae_ids] if isinstance(sae_ids, str) else list(sae_ids)
        for sae_id in ids:
            if sae_id not in self.saes:
                raise KeyError(f"no attached SAE {sae_id!r}; attached: {sorted(self.saes)}")
        return ids

    def _check_feature(self, sae_id: str, feature: int) -> int:
        d_sae = self.saes[sae_id].cfg.d_sae
        if not 0 <= int(feature) < d_sae:
            raise ValueError(f"feature {feature} out of range for SAE {sae_id!r} (d_sae={d_sae})")
        return int(feature)


@torch.no_grad()
def decoder_direction(sae, feature: int) -> torch.Tensor:
    """d_f = decode(e_f) - decode(0): the feature's contribution per unit activation, raw units."""
    codes = torch.zeros(2, sae.cfg.d_sae, device=sae.W_dec.device, dtype=sae.W_dec.dtype)
    codes[0, feature] = 1.0
    out = sae.decode(codes).float()
    return out[0] - out[1]


def _apply(x: torch.Tensor, iv: Intervention, sae, direction: torch.Tensor, t0: int) -> torch.Tensor:
    T = x.shape[-2]
    start = iv.start_pos - t0  # first row of this chunk the edit applies to
    if start >= T:
        return x
    if iv.kind == "steer":
        delta = direction.to(x.dtype)
        if start <= 0:
            return x + delta
        mask = (torch.arange(T, device=x.device) >= start).to(x.dtype)[:, None]
        return x + mask * delta
    coef = iv.value - sae.encode(x)[..., iv.feature]  # [B, T] fp32
    if start > 0:
        coef = torch.where(torch.arange(T, device=x.device) >= start, coef, 0.0)
    return x + (coef[..., None] * direction).to(x.dtype)


@torch.no_grad()
def _record(x: torch.Tensor, sae, tracking: _Tracking, t0: int) -> None:
    codes = sae.encode(x)  # [B, T, d_sae]
    values, ids = codes.topk(tracking.top_n, dim=-1)
    watched = codes.index_select(-1, tracking.watch)
    tracking.chunks.append((t0, values, ids, watched))


def _by_id(saes) -> dict:
    if isinstance(saes, Mapping):
        return dict(saes)
    out = {}
    for sae in saes:
        sae_id = sae.cfg.hook_name
        if sae_id in out:
            raise ValueError(f"two SAEs at {sae_id!r}: pass them as a dict {{id: sae}} with distinct ids")
        out[sae_id] = sae
    return out


def _kv_cache_index(model) -> int:
    """Position of `kv_cache` among model.forward's positional parameters (idx first)."""
    params = list(inspect.signature(model.forward).parameters)
    if "kv_cache" not in params:
        raise TypeError(f"{type(model).__name__}.forward has no kv_cache parameter")
    return params.index("kv_cache")
