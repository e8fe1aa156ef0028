"""
Spliced evaluation of SAEs on held-out text: what the model loses when it runs on the SAE's
reconstruction instead of its own activations.

Per SAE, on the first `n_tokens` non-BOS tokens of the corpus's val split (BOS-aligned windows,
unshuffled, so the numbers are reproducible):
- ce_clean, ce_spliced, ce_zero_ablation: next-token cross-entropy in nats, averaged over positions
  whose input token is not BOS and whose target is a real token;
- delta_ce = ce_spliced - ce_clean; ce_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean);
- kl = mean KL(p_clean ‖ p_spliced) per token, kl_zero_ablation likewise, and
  kl_score = (kl_zero - kl) / kl_zero (SAELens's kl_div_score);
- the reconstruction metrics of sae.metrics (centered FVU, SAELens-compatible EV, MSE, L0, dead and
  dense fractions, γ, ...) and a log10-density histogram, on every non-BOS token of the same windows.

Notable choices:
- The splice goes through `sae.hooks.edit` and replaces only non-BOS, non-padding positions, so
  the BOS/sink residual is untouched; in nanochat everything downstream (later blocks) sees the edit.
  Zero ablation replaces the same positions with zeros (in nanochat the x0 path is not part of the
  residual at a block output, so this is harsher than in GPT-2; ΔCE and KL are the comparable numbers).
- Several SAEs are evaluated in one pass: one clean forward captures every hook, then one spliced
  forward per SAE and one zero-ablation forward per distinct hook.
- SAE math runs in fp32 with autocast off; the model runs in inference mode with bf16 autocast on
  CUDA only. Sums are float64.
- `write_eval_json` merges the result into the SAE folder's eval.json under "val" (the trainer's own
  metrics stay), written atomically.
"""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nanochat.common import autocast
from nanochat.dataset import iter_batches, iter_documents, iter_windows
from sae.activations import hook_dims
from sae.hooks import capture, edit
from sae.metrics import SAEMetrics, log_density_histogram


@dataclass
class EvalConfig:
    n_tokens: int = 65_536  # non-BOS held-out tokens to evaluate on (fewer if the split is smaller)
    seq_len: int | None = None  # window length (BOS included); None: the model's sequence_len
    batch_windows: int = 4  # windows per forward
    split: str = "val"
    zero_ablation: bool = True  # also run the zero-ablation forwards (ce_recovered, kl_score)


def evaluate_saes(model, tokenizer, corpus, saes: Sequence, cfg: EvalConfig | None = None,
                  device=None, quiet: bool = False) -> list[dict]:
    """One dict of metrics per SAE (same order), all from one pass over the held-out windows."""
    cfg = cfg or EvalConfig()
    if not saes:
        raise ValueError("evaluate_saes: no SAEs given")
    if cfg.n_tokens <= 0:
        raise ValueError(f"EvalConfig.n_tokens={cfg.n_tokens}: expected > 0")
    device = torch.device(device) if device is not None else model.get_device()
    hooks = list(dict.fromkeys(s.cfg.hook_name for s in saes))
    dims = hook_dims(model, hooks)  # raises on unknown hooks / layers out of range
    for s in saes:
        if s.cfg.d_in != dims[s.cfg.hook_name]:
            raise ValueError(f"SAE {s.cfg.folder_name!r} has d_in={s.cfg.d_in} but {s.cfg.hook_name} of "
                             f"this model is {dims[s.cfg.hook_name]} wide")
    saes = [s.to(device).eval() for s in saes]
    seq_len = int(cfg.seq_len or model.config.sequence_len)
    bos = tokenizer.get_bos_token_id()

    recon = [SAEMetrics(s.cfg.d_sae) for s in saes]
    ce = _Sums()
    spliced = [_Sums() for _ in saes]
    zeroed = {h: _Sums() for h in hooks} if cfg.zero_ablation else {}
    n_valid = 0
    bar = tqdm(total=cfg.n_tokens, unit="tok", desc="evaluate SAEs",
               disable=quiet or not sys.stderr.isatty())
    windows = iter_windows(iter_documents(corpus, cfg.split), tokenizer, seq_len)
    for batch in iter_batches(windows, cfg.batch_windows, bos):
        idx, valid = batch.idx.to(device), batch.valid.to(device)
        ce_mask = valid[:, :-1] & valid[:, 1:]  # input not BOS, target a real token
        targets = idx[:, 1:][ce_mask]
        with torch.inference_mode(), autocast(device):
            with capture(model, hooks) as acts:
                logits = model(idx)
            acts = {h: a[valid].float() for h, a in acts.items()}
            logp_clean = _masked_log_probs(logits, ce_mask)
            ce.add(-logp_clean.gather(1, targets[:, None]).squeeze(1))
            for i, sae in enumerate(saes):
                x = acts[sae.cfg.hook_name]
                with torch.autocast(device.type, enabled=False):
                    codes = sae.encode(x)
                    x_hat = sae.decode(codes)
                recon[i].update(x, x_hat, codes)
                splice = _replace_valid(valid, x_hat)
                with edit(model, sae.cfg.hook_name, splice):
                    logp = _masked_log_probs(model(idx), ce_mask)
                spliced[i].add(-logp.gather(1, targets[:, None]).squeeze(1), _kl(logp_clean, logp))
            for h, sums in zeroed.items():
                with edit(model, h, _replace_valid(valid, None)):
                    logp = _masked_log_probs(model(idx), ce_mask)
                sums.add(-logp.gather(1, targets[:, None]).squeeze(1), _kl(logp_clean, logp))
        n_valid += int(valid.sum())
        bar.update(min(int(valid.sum()), max(0, cfg.n_tokens - bar.n)))
        if n_valid >= cfg.n_tokens:
            break
    bar.close()
    if n_valid == 0:
        raise ValueError(f"corpus {corpus} ({cfg.split} split) has no tokens besides BOS to evaluate on")

    results = []
    for i, sae in enumerate(saes):
        metrics = recon[i].compute()
        r = {"sae": sae.cfg.folder_name, "hook_name": sae.cfg.hook_name, "split": cfg.split,
             "corpus": str(corpus), "eval_config": asdict(cfg), "n_ce_tokens": ce.n,
             "ce_clean": ce.mean_ce(), "ce_spliced": spliced[i].mean_ce(),
             "delta_ce": spliced[i].mean_ce() - ce.mean_ce(), "kl": spliced[i].mean_kl()}
        if cfg.zero_ablation:
            z = zeroed[sae.cfg.hook_name]
            r["ce_zero_ablation"] = z.mean_ce()
            r["kl_zero_ablation"] = z.mean_kl()
            gap = z.mean_ce() - ce.mean_ce()
            r["ce_recovered"] = (z.mean_ce() - spliced[i].mean_ce()) / gap if gap != 0 else float("nan")
            r["kl_score"] = ((z.mean_kl() - r["kl"]) / z.mean_kl() if z.mean_kl() != 0 else float("nan"))
        r.update(metrics)
        r["log10_density_histogram"] = log_density_histogram(recon[i].log10_density())
        results.append(r)
    return results


def write_eval_json(sae_dir, result: dict) -> Path:
    """Merge `result` into <sae_dir>/eval.json under "val" (other keys kept); atomic."""
    path = Path(sae_dir) / "eval.json"
    report = {}
    if path.exists():
        try:
            report = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"cannot parse {path}: {e}") from e
    report["val"] = result
    return save_json(path, report)


def save_json(path, obj) -> Path:
    """Write obj as JSON atomically (temp file + rename); NaN/inf become null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(_finite(obj), indent=2))
    os.replace(tmp, path)
    return path


# ---- helpers ----

class _Sums:
    """float64 sums of per-token CE and KL."""

    def __init__(self):
        self.n, self.ce, self.kl = 0, 0.0, 0.0

    def add(self, ce: torch.Tensor, kl: torch.Tensor | None = None):
        self.n += ce.numel()
        self.ce += float(ce.double().sum())
        if kl is not None:
            self.kl += float(kl.double().sum())

    def mean_ce(self) -> float:
        return self.ce / self.n if self.n else float("nan")

    def mean_kl(self) -> float:
        return self.kl / self.n if self.n else float("nan")


def _masked_log_probs(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log-softmax (fp32) of the logits at positions where mask (B, T-1) holds: (n, V)."""
    return F.log_softmax(logits[:, :-1][mask].float(), dim=-1)


def _kl(logp_p: torch.Tensor, logp_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row, from log-probabilities."""
    return (logp_p.exp() * (logp_p - logp_q)).sum(-1)


def _replace_valid(valid: torch.Tensor, values: torch.Tensor | None):
    """An edit function: put `values` ([n_valid, d], or zeros if None) at the valid positions."""
    def fn(t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        out[valid] = 0 if values is None else values.to(t.dtype)
        return out
    return fn


def _finite(obj):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
