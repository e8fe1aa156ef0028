"""
Pick the model and its matching text the way every command does:
`--checkpoint` if given, else the latest base model under $NANOCHAT_BASE_DIR,
else the embedded demo model (built once and cached, see demo.py).
The corpus defaults to the shards that sit with that model (nanochat's base_data,
or the demo corpus); `--data` overrides it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nanochat.checkpoint_manager import (SOURCE_DIRS, find_largest_model, find_last_step,
                                         find_tokenizer_dir, load_model_from_dir)
from nanochat.common import get_base_dir
from nanochat.dataset import find_nanochat_data_dir, list_corpus_files


@dataclass
class ModelSource:
    model: object          # nanochat.gpt.GPT
    tokenizer: object      # nanochat.tokenizer.Tokenizer
    meta: dict
    checkpoint_dir: Path
    step: int
    model_id: str          # e.g. 'nanochat-d20'
    kind: str              # 'explicit' | 'nanochat' | 'demo'
    data_dir: Path | None  # the corpus that belongs with this model, if any

    def describe(self) -> str:
        c = self.model.config
        n_params = sum(p.numel() for p in self.model.parameters())
        return (f"{self.model_id} ({self.kind}): {self.checkpoint_dir} step {self.step}; "
                f"{c.n_layer} layers, d_model {c.n_embd}, {c.n_head} heads, vocab {c.vocab_size}, "
                f"{n_params / 1e6:.1f}M params; corpus: {self.data_dir or 'none found'}")


def resolve_model(checkpoint=None, device="cpu", quiet: bool = False) -> ModelSource:
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"--checkpoint not found: {path}")
        return _load(path, device, "explicit")
    base_checkpoints = get_base_dir() / SOURCE_DIRS["base"]
    if _has_checkpoint(base_checkpoints):
        return _load(base_checkpoints / find_largest_model(base_checkpoints), device, "nanochat")
    from nanochat.demo import ensure_demo
    demo_dir = ensure_demo(quiet=quiet)
    checkpoints = demo_dir / SOURCE_DIRS["base"]
    return _load(checkpoints / find_largest_model(checkpoints), device, "demo")


def resolve_corpus(source: ModelSource, data=None) -> Path:
    """`data` if given (checked to exist), else the model's own corpus."""
    if data is not None:
        path = Path(data).expanduser()
        list_corpus_files(path)  # raises with the path if missing or empty
        return path
    if source.data_dir is None:
        raise FileNotFoundError(
            f"no corpus found for {source.checkpoint_dir}: expected nanochat's base_data/ or "
            f"base_data_climbmix/ next to its tokenizer, or pass --data PATH")
    return source.data_dir


def _has_checkpoint(checkpoints_dir: Path) -> bool:
    try:
        find_last_step(checkpoints_dir / find_largest_model(checkpoints_dir))
        return True
    except FileNotFoundError:
        return False


def _load(path: Path, device, kind: str) -> ModelSource:
    model, tokenizer, meta = load_model_from_dir(path, device, "eval")
    checkpoint_dir = Path(meta["checkpoint_dir"])
    try:
        base_dir = find_tokenizer_dir(checkpoint_dir).parent
        data_dir = find_nanochat_data_dir(base_dir)
    except FileNotFoundError:
        data_dir = None
    model_id = meta.get("model_id") or f"nanochat-{checkpoint_dir.name}"
    return ModelSource(model, tokenizer, meta, checkpoint_dir, int(meta["step"]), model_id,
                       kind, data_dir)
