"""The tokenizer matches nanochat's semantics and exposes raw bytes for display."""

import pytest

from nanochat.tokenizer import Tokenizer


def test_fixture_tokenizer_round_trip(d4_dir):
    tok = Tokenizer.from_directory(d4_dir / "tokenizer")
    assert tok.get_vocab_size() == 4096 and tok.get_bos_token_id() == 4087
    text = "def f(x):\n    return x ** 2  # café ☕ 日本語"
    ids = tok.encode(text, prepend="<|bos|>")
    assert ids[0] == 4087 and tok.decode(ids[1:]) == text
    # special-token strings in text are plain text, as in nanochat
    assert 4087 not in tok.encode("<|bos|> hello")
    batch = tok.encode(["a b", "c"], prepend=tok.get_bos_token_id())
    assert [b[0] for b in batch] == [4087, 4087]


def test_token_bytes_handle_partial_utf8(d4_dir):
    tok = Tokenizer.from_directory(d4_dir / "tokenizer")
    raw = [tok.token_bytes(i) for i in range(256)]
    assert raw[0xE2] == b"\xe2"          # half of a UTF-8 character
    assert raw[0xE2].decode("utf-8", errors="replace") == "\ufffd"
    assert tok.token_bytes(4087) == b"<|bos|>"
    assert sum(len(b) for b in tok.all_token_bytes()) > 4096


def test_trained_tokenizer_saves_in_nanochat_layout(tmp_path):
    import torch
    docs = ["the quick brown fox jumps over the lazy dog"] * 100 + ["naïve café"] * 20
    tok = Tokenizer.train_from_iterator(iter(docs), 280)
    tok.save(tmp_path)
    again = Tokenizer.from_directory(tmp_path)
    assert again.encode("the quick fox") == tok.encode("the quick fox")
    lengths = torch.load(tmp_path / "token_bytes.pt")
    assert lengths.dtype == torch.int32 and lengths.shape == (280,)
    assert lengths[again.get_bos_token_id()] == 0 and lengths[ord("a")] == 1


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.pkl"):
        Tokenizer.from_directory(tmp_path)
    (tmp_path / "tokenizer.pkl").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="tokenizer.pkl"):
        Tokenizer.from_directory(tmp_path)


def test_too_little_text_for_the_vocab_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than the"):
        Tokenizer.train_from_iterator(iter(["ab ab ab"]), 400)
