"""
Saving and loading SAEs: SAELens folders (the default) and EleutherAI sparsify folders.

SAELens folder (recipe §5.3), written atomically (temp dir + rename):
    cfg.json                  flat v5-style config, which SAELens 5.x and 6.x both load
    sae_weights.safetensors   W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec (+ threshold)
    sparsity.safetensors      optional {"sparsity": log10(density + 1e-10)} [d_sae]
plus any extra files the caller hands over (the trainer adds eval.json and training_state.pt).

Notable choices:
- Only inference forms are written: topk, jumprelu, relu ("standard" in SAELens). `save_sae` calls
  `sae.export()`, which folds the input scale and decoder norms and turns BatchTopK and Gated SAEs
  into JumpReLUs, so a loaded SAE takes raw activations.
- Our full SAEConfig sits under the cfg.json key "nanochat_atlas" (SAELens ignores unknown keys);
  we never write `sae_lens_version` (v6 would then skip its pre-6 conversion and drop `k`) nor a
  `scaling_factor` tensor.
- `load_sae` also reads third-party SAELens folders (flat v5 or nested v6 cfg; standard, topk,
  jumprelu, and gated, which is converted to the equivalent JumpReLU) and sparsify folders.
"""

import io
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae.config import SAEConfig, layer_from_hook_name
from sae.models import SAE, build_sae

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
SPARSIFY_WEIGHTS_FILE = "sae.safetensors"
FORMAT_VERSION = 1

_SAELENS_ARCH = {"topk": "topk", "jumprelu": "jumprelu", "relu": "standard"}
_TENSORS = {
    "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "relu": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
}


def save_sae(sae: SAE, out_dir, sparsity: torch.Tensor | None = None, extra: dict | None = None,
             extra_files: dict[str, bytes] | None = None) -> Path:
    """Write `sae` (exported to its inference form) as a SAELens folder, replacing out_dir atomically.

    sparsity: log10 feature density [d_sae] (as SAELens stores it), or None.
    extra: additional top-level cfg.json keys (must not clash with the SAELens keys).
    extra_files: {file name: bytes} written into the same folder in the same swap.
    """
    sae = sae.export()
    cfg = saelens_cfg_dict(sae.cfg)
    for key, value in (extra or {}).items():
        if key in cfg:
            raise ValueError(f"save_sae: extra key {key!r} clashes with a cfg.json key")
        cfg[key] = value
    tensors = {name: getattr(sae, name).detach().float().cpu().contiguous() for name in _TENSORS[sae.cfg.architecture]}
    if sparsity is not None:
        sparsity = sparsity.detach().float().cpu().reshape(-1).contiguous()
        if sparsity.numel() != sae.cfg.d_sae:
            raise ValueError(f"save_sae: sparsity has {sparsity.numel()} values, expected d_sae={sae.cfg.d_sae}")
        if bool((sparsity > 0).any()):
            raise ValueError("save_sae: sparsity must be log10(density) (all <= 0), not density counts")

    def write(tmp: Path):
        (tmp / CFG_FILE).write_text(json.dumps(cfg, indent=2))
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        if sparsity is not None:
            save_file({"sparsity": sparsity}, str(tmp / SPARSITY_FILE))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)

    return atomic_write_dir(out_dir, write)


def saelens_cfg_dict(cfg: SAEConfig) -> dict:
    """Flat, v5-style cfg.json content that SAELens 5.x and 6.x both load (recipe §5.3)."""
    if cfg.architecture not in _SAELENS_ARCH:
        raise ValueError(f"{cfg.architecture!r} is not an inference architecture; call sae.export() first")
    topk = cfg.architecture == "topk"
    d = {
        "architecture": _SAELENS_ARCH[cfg.architecture],
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "activation_fn_str": "topk" if topk else "relu",
        "activation_fn_kwargs": {"k": cfg.k} if topk else {},
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "finetuning_scaling_factor": False,
        "normalize_activations": "none",
        "dtype": "float32",
        "device": "cpu",
        "model_name": cfg.model_id or "nanochat",
        "hook_name": cfg.hook_name,
        "hook_layer": cfg.layer if cfg.layer is not None else 0,
        "hook_head_index": None,
        "context_size": cfg.context_size,
        "prepend_bos": True,
        "dataset_path": cfg.dataset_path,
        "dataset_trust_remote_code": False,
        "sae_lens_training_version": None,
        "neuronpedia_id": None,
        "model_from_pretrained_kwargs": {},
        "seqpos_slice": [None],
    }
    if topk:
        d["k"] = cfg.k  # v5 ignores it; protects v6 if the dict is ever read as v6-native
    d["nanochat_atlas"] = {"format_version": FORMAT_VERSION, **cfg.to_dict()}
    return d


def load_sae(path, device: str = "cpu") -> SAE:
    """Load a SAELens folder (ours or third-party) or a sparsify folder as an inference-form SAE.

    Parameters come back with requires_grad off (inference); call sae.requires_grad_() to tune it."""
    return _load(Path(path)).requires_grad_(False).to(device)


def _load(path: Path) -> SAE:
    if not path.is_dir():
        raise FileNotFoundError(f"load_sae: {path} is not a directory (expected a folder with {CFG_FILE})")
    raw = _read_json(path / CFG_FILE)
    if (path / SPARSIFY_WEIGHTS_FILE).exists() and not (path / WEIGHTS_FILE).exists():
        return _load_sparsify(path, raw)
    cfg = _cfg_from_saelens(raw, path / CFG_FILE)
    tensors = _read_tensors(path / WEIGHTS_FILE)
    if raw.get("architecture") == "gated":
        return _gated_to_jumprelu(cfg, tensors, path / WEIGHTS_FILE)
    if cfg.architecture == "jumprelu" and "threshold" not in tensors and "log_threshold" in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()  # older SAELens JumpReLUs
    sae = _blank(cfg)
    _load_exact(sae, tensors, _TENSORS[cfg.architecture], path / WEIGHTS_FILE)
    return sae


def load_sparsity(path) -> torch.Tensor | None:
    """log10 feature density from a SAELens folder's sparsity.safetensors, or None if absent."""
    f = Path(path) / SPARSITY_FILE
    if not f.exists():
        return None
    tensors = _read_tensors(f)
    if "sparsity" not in tensors:
        raise KeyError(f"{f}: missing tensor 'sparsity' (found {sorted(tensors)})")
    return tensors["sparsity"]


def save_sparsify(sae: SAE, out_dir) -> Path:
    """Write a TopK SAE in EleutherAI sparsify's per-hookpoint layout (cfg.json + sae.safetensors)."""
    sae = sae.export()
    cfg = sae.cfg
    if cfg.architecture != "topk":
        raise ValueError(f"save_sparsify: sparsify only has TopK SAEs, this one is {cfg.architecture!r}")
    # sparsify always encodes x - b_dec: fold b_dec·W_enc into the bias when we did not subtract it
    b_enc = sae.b_enc if cfg.apply_b_dec_to_input else sae.b_enc + sae.b_dec @ sae.W_enc
    tensors = {
        "encoder.weight": sae.W_enc.t(), "encoder.bias": b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec,
    }
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    sparsify_cfg = {
        "activation": "topk", "expansion_factor": max(1, cfg.d_sae // cfg.d_in), "normalize_decoder": True,
        "num_latents": cfg.d_sae, "k": cfg.k, "multi_topk": False, "skip_connection": False,
        "transcode": False, "d_in": cfg.d_in,
        "nanochat_atlas": {"format_version": FORMAT_VERSION, **cfg.to_dict(), "apply_b_dec_to_input": True},
    }

    def write(tmp: Path):
        (tmp / CFG_FILE).write_text(json.dumps(sparsify_cfg, indent=2))
        save_file(tensors, str(tmp / SPARSIFY_WEIGHTS_FILE))

    return atomic_write_dir(out_dir, write)


def atomic_write_dir(out_dir, write) -> Path:
    """Call write(tmp_dir) on a fresh sibling temp dir, then swap it into out_dir."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private (0700); an SAE folder is meant to be shared
        write(tmp)
        if out.exists():
            # rename() cannot replace a non-empty dir: move the old one aside, swap, then delete it
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def atomic_write_bytes(path, data: bytes):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ---- helpers ----

def _blank(cfg: SAEConfig) -> SAE:
    """A model to load weights into; its own generator leaves the global RNG untouched."""
    return build_sae(cfg, torch.Generator())


def _read_json(f: Path) -> dict:
    if not f.exists():
        raise FileNotFoundError(f"{f}: missing (an SAE folder needs {CFG_FILE})")
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{f}: expected a JSON object, got {type(d).__name__}")
    return d


def _read_tensors(f: Path) -> dict:
    if not f.exists():
        raise FileNotFoundError(f"{f}: missing")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{f}: not a readable safetensors file ({e})") from e


def _require(d: dict, key: str, f: Path):
    if key not in d:
        raise KeyError(f"{f}: missing key {key!r}")
    return d[key]


def _cfg_from_saelens(raw: dict, f: Path) -> SAEConfig:
    ours = raw.get("nanochat_atlas")
    if ours is not None:
        try:
            cfg = SAEConfig.from_dict({k: v for k, v in ours.items() if k != "format_version"})
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{f}: bad 'nanochat_atlas' config ({e})") from e
        if ours.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{f}: format_version {ours['format_version']} is newer than this code ({FORMAT_VERSION})")
        if cfg.architecture not in _TENSORS or cfg.input_scale != 1.0:
            raise ValueError(f"{f}: 'nanochat_atlas' holds a training-form config "
                             f"({cfg.architecture}, input_scale={cfg.input_scale})")
        return cfg
    # a third-party SAELens cfg: flat v5, or v6 with LLM fields under 'metadata'
    meta = raw.get("metadata") or {}
    arch = raw.get("architecture", "standard")
    if arch not in ("standard", "topk", "jumprelu", "gated"):
        raise ValueError(f"{f}: architecture {arch!r} is not supported (standard, topk, jumprelu, gated)")
    norm = raw.get("normalize_activations", "none") or "none"
    if norm != "none":
        raise ValueError(f"{f}: normalize_activations={norm!r} is not supported; "
                         "nanochat-atlas SAEs take raw activations")
    if raw.get("hook_head_index", meta.get("hook_head_index")) is not None:
        raise ValueError(f"{f}: hook_head_index is set; per-head SAEs are not supported")
    k = None
    if arch == "topk":
        k = raw.get("k") or (raw.get("activation_fn_kwargs") or {}).get("k")
        if k is None:
            raise KeyError(f"{f}: topk SAE without 'k' (or activation_fn_kwargs.k)")
    hook_name = raw.get("hook_name", meta.get("hook_name", ""))
    layer = raw.get("hook_layer", layer_from_hook_name(hook_name))
    arch_ours = {"standard": "relu", "gated": "gated"}.get(arch, arch)
    try:
        return SAEConfig(
            d_in=int(_require(raw, "d_in", f)), d_sae=int(_require(raw, "d_sae", f)), architecture=arch_ours, k=k,
            hook_name=hook_name, layer=layer, model_id=raw.get("model_name", meta.get("model_name", "")) or "",
            context_size=int(raw.get("context_size", meta.get("context_size")) or 0),
            dataset_path=raw.get("dataset_path", meta.get("dataset_path", "")) or "",
            apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{f}: {e}") from e


def _load_exact(sae: SAE, tensors: dict, names: tuple, f: Path):
    missing = [n for n in names if n not in tensors]
    extra = sorted(set(tensors) - set(names))
    if missing or extra:
        raise KeyError(f"{f}: expected tensors {list(names)}; missing {missing}, unexpected {extra}")
    for name in names:
        want = tuple(getattr(sae, name).shape)
        if tuple(tensors[name].shape) != want:
            raise ValueError(f"{f}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {want}")
    sae.load_state_dict({n: tensors[n].float() for n in names}, strict=False)


def _gated_to_jumprelu(cfg: SAEConfig, tensors: dict, f: Path) -> SAE:
    gated = _blank(cfg)
    names = ("W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag")
    renamed = {("b_enc" if k == "b_gate" else k): v for k, v in tensors.items()}
    missing = [n for n in names if n not in tensors]
    if missing:
        raise KeyError(f"{f}: gated SAE missing tensors {missing}")
    _load_exact(gated, renamed, ("W_enc", "b_enc", "W_dec", "b_dec", "b_mag", "r_mag"), f)
    return gated.export()


def _load_sparsify(path: Path, raw: dict) -> SAE:
    f = path / CFG_FILE
    if raw.get("activation", "topk") != "topk":
        raise ValueError(f"{f}: sparsify activation {raw.get('activation')!r} is not supported (topk only)")
    tensors = _read_tensors(path / SPARSIFY_WEIGHTS_FILE)
    for name in ("encoder.weight", "encoder.bias", "W_dec", "b_dec"):
        if name not in tensors:
            raise KeyError(f"{path / SPARSIFY_WEIGHTS_FILE}: missing tensor {name!r}")
    if "W_skip" in tensors or raw.get("transcode"):
        raise ValueError(f"{f}: transcoders / skip connections are not supported")
    ours = raw.get("nanochat_atlas") or {}
    n, d = tensors["encoder.weight"].shape
    hook_name = ours.get("hook_name", path.name)
    cfg = SAEConfig(d_in=d, d_sae=n, architecture="topk", k=int(_require(raw, "k", f)), hook_name=hook_name,
                    layer=ours.get("layer", layer_from_hook_name(hook_name)), model_id=ours.get("model_id", ""),
                    checkpoint=ours.get("checkpoint", ""), train_tokens=ours.get("train_tokens", 0),
                    name=ours.get("name", ""), apply_b_dec_to_input=True)
    sae = _blank(cfg)
    mapped = {"W_enc": tensors["encoder.weight"].t(), "b_enc": tensors["encoder.bias"],
              "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}
    _load_exact(sae, mapped, _TENSORS["topk"], path / SPARSIFY_WEIGHTS_FILE)
    return sae

