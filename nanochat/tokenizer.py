"""
nanochat's tokenizer: a pickled tiktoken Encoding (`tokenizer.pkl`) plus `token_bytes.pt`.

Same surface as nanochat's RustBPETokenizer: `encode(text, prepend=bos)`, `decode`,
`get_bos_token_id`, `encode_special`. Special-token strings inside text are encoded as
plain text (tiktoken's encode_ordinary), exactly as nanochat does.
For display we also expose each token's raw bytes: a token may hold half a UTF-8
character, so callers decide how to render it (never decode a single token blindly).
Training (for the demo model) uses rustbpe, as nanochat's tok_train does.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

SPECIAL_TOKENS = [
    "<|bos|>",
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",
    "<|output_start|>", "<|output_end|>",
]
# GPT-4's pattern with numbers grouped 1-2 digits, as in nanochat
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}|"""
                 r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")


class Tokenizer:
    def __init__(self, enc):
        self.enc = enc
        self.bos_token_id = self.encode_special("<|bos|>")

    @classmethod
    def from_directory(cls, tokenizer_dir: str | os.PathLike) -> "Tokenizer":
        path = Path(tokenizer_dir) / "tokenizer.pkl"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer not found: {path}")
        try:
            with open(path, "rb") as f:
                enc = pickle.load(f)
        except Exception as e:  # a truncated or foreign pickle
            raise ValueError(f"cannot read tokenizer {path}: {e}") from e
        if "<|bos|>" not in getattr(enc, "_special_tokens", {}):
            raise ValueError(f"tokenizer {path} has no <|bos|> special token")
        return cls(enc)

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size: int) -> "Tokenizer":
        import rustbpe
        import tiktoken
        n_ordinary = vocab_size - len(SPECIAL_TOKENS)
        if n_ordinary < 256:
            raise ValueError(f"vocab_size {vocab_size} leaves fewer than 256 ordinary tokens")
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(text_iterator, n_ordinary, pattern=SPLIT_PATTERN)
        ranks = {bytes(k): v for k, v in tok.get_mergeable_ranks()}
        if len(ranks) != n_ordinary:
            # rustbpe stops early when the text has no pair left to merge
            raise ValueError(f"the training text only supports {len(ranks)} ordinary tokens, "
                             f"fewer than the {n_ordinary} needed for vocab_size {vocab_size}; "
                             f"use more text or a smaller vocabulary")
        specials = {name: n_ordinary + i for i, name in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(name="rustbpe", pat_str=tok.get_pattern(),
                                mergeable_ranks=ranks, special_tokens=specials)
        return cls(enc)

    def save(self, tokenizer_dir: str | os.PathLike) -> None:
        """Write tokenizer.pkl and token_bytes.pt in nanochat's layout (atomically)."""
        d = Path(tokenizer_dir)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / "tokenizer.pkl.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(self.enc, f)
        os.replace(tmp, d / "tokenizer.pkl")
        special = set(self.enc._special_tokens.values())
        lengths = [0 if i in special else len(self.token_bytes(i)) for i in range(self.get_vocab_size())]
        tmp = d / "token_bytes.pt.tmp"
        torch.save(torch.tensor(lengths, dtype=torch.int32), tmp)
        os.replace(tmp, d / "token_bytes.pt")

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def get_special_tokens(self) -> dict[str, int]:
        return dict(self.enc._special_tokens)

    def encode_special(self, text: str) -> int:
        return self.enc.encode_single_token(text)

    def _as_id(self, tok):
        return self.encode_special(tok) if isinstance(tok, str) else tok

    def encode(self, text, prepend=None, append=None, num_threads: int = 8):
        """str -> list[int], or list[str] -> list[list[int]]."""
        pre = self._as_id(prepend) if prepend is not None else None
        post = self._as_id(append) if append is not None else None
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            if pre is not None:
                ids.insert(0, pre)
            if post is not None:
                ids.append(post)
            return ids
        out = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
        for ids in out:
            if pre is not None:
                ids.insert(0, pre)
            if post is not None:
                ids.append(post)
        return out

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    def id_to_token(self, token_id: int) -> str:
        return self.enc.decode([token_id])

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token; special tokens give their literal name."""
        return self.enc.decode_single_token_bytes(token_id)

    def all_token_bytes(self) -> list[bytes]:
        return [self.token_bytes(i) for i in range(self.get_vocab_size())]
