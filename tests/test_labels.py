"""The rule-based labeller: each rule of the cascade on windows built to trigger it, and the detection score."""

import pytest

from atlas.labels import Predicate, Vocab, Window, label_feature, matches, score_label

TOKENS = [b"<|bos|>", b" the", b" of", b"The", b" cat", b" 12", b"7", b"\n", b")", b" dog",
          b" apple", b" x", b" def", b"(", b" return", b":", b" walk", b" walked", b" walking",
          b" walks", b"\x00", b" banana", b" a", b" is", b" on", b" mat", b" big", b" red", b" 3",
          b" \xd0\xba\xd0\xbe\xd1\x82", b" \xd0\xb4\xd0\xbe\xd0\xbc", b" tree", b" sun", b" blue",
          b" cup", b" pen", b" car", b" hat", b" box", b" 450"]
ID = {b.decode("utf-8", "replace").strip() or b.decode(): i for i, b in enumerate(TOKENS)}
FILLER = [ID[w] for w in ("a", "is", "on", "mat", "big", "red", "tree", "sun", "blue", "cup", "pen",
                          "car", "hat", "box")]


def vocab(freq=None):
    return Vocab(TOKENS, bos_id=0, token_freq=freq)


def win(center_tok, before=(), after=(), pos=10, act=1.0):
    tokens = (0,) + tuple(before) + (center_tok,) + tuple(after)
    return Window(tokens, len(before) + 1, pos, act)


def filler(i, n=3):
    return [FILLER[(i * 5 + j) % len(FILLER)] for j in range(n)]


def diverse_windows(n=20, after=None):
    """Windows whose center tokens are all different and share no class."""
    return [win(FILLER[i % len(FILLER)], filler(i), [after(i)] if after else filler(i + 1, 2))
            for i in range(n)]


def test_one_dominant_token_folds_case_and_spaces():
    v = vocab()
    top = [win(ID["the"], filler(i)) for i in range(12)]
    top += [win(ID["The"], filler(i)) for i in range(4)] + diverse_windows(4)
    label = label_feature(top, [ID["cat"]], v)
    assert (label.text, label.rule) == ('"the"', "max_token")
    assert matches(label.predicate, win(ID["The"]), v) and not matches(label.predicate, win(ID["of"]), v)


def test_dominant_preceding_token_qualifies_the_label():
    v = vocab()
    top = [win(ID["the"], filler(i) + [ID["of"]]) for i in range(15)] + diverse_windows(5)
    label = label_feature(top, [], v)
    assert (label.text, label.rule) == ('"the" after "of"', "max_token_bigram")
    assert matches(label.predicate, win(ID["the"], [ID["of"]]), v)
    assert not matches(label.predicate, win(ID["the"], [ID["big"]]), v)


def test_three_tokens_covering_most_examples():
    v = vocab()
    top = ([win(ID["cat"], filler(i)) for i in range(8)] + [win(ID["dog"], filler(i)) for i in range(6)]
           + [win(ID["apple"], filler(i)) for i in range(3)] + diverse_windows(3))
    label = label_feature(top, [], v)
    assert (label.text, label.rule) == ('"cat"/"dog"/"apple"', "max_token")


def test_shared_class_of_the_max_tokens():
    v = vocab()
    digits = [ID["12"], ID["7"], ID["3"], ID["450"]]
    top = [win(digits[i % 4] if i < 16 else FILLER[i % len(FILLER)], filler(i)) for i in range(20)]
    label = label_feature(top, [], v)
    assert (label.text, label.rule) == ("digits", "max_token_class")
    assert matches(label.predicate, win(ID["450"]), v) and not matches(label.predicate, win(ID["cat"]), v)


def test_next_token_rule_says_the_following_token():
    v = vocab()
    top = diverse_windows(14, after=lambda i: ID[")"])
    label = label_feature(top, [], v)
    assert (label.text, label.rule) == ('say ")"', "next_token")
    assert matches(label.predicate, win(ID["cat"], after=[ID[")"]]), v)


def test_next_token_class():
    v = vocab()
    digits = [ID["12"], ID["7"], ID["3"], ID["450"]]
    top = diverse_windows(14, after=lambda i: digits[i % 4])
    label = label_feature(top, [], v)
    assert (label.text, label.rule) == ("say digits", "next_token_class")


def test_logit_class_with_a_shared_prefix():
    v = vocab()
    logits = [ID[w] for w in ("walk", "walked", "walking", "walks")]
    label = label_feature(diverse_windows(14), logits, v)
    assert label.rule == "logit_class"
    assert label.text == 'promotes prefix "walk": "walk", "walked", "walking"'
    assert matches(label.predicate, win(ID["cat"], after=[ID["walking"]]), v)


def test_non_latin_script_class():
    v = vocab()
    logits = [ID["кот"], ID["дом"], ID["кот"]]
    label = label_feature(diverse_windows(14), logits, v)
    assert label.text.startswith("promotes Cyrillic script")


def test_context_class_for_code():
    v = vocab()
    # centers and next tokens vary, so the code around them decides
    top = [win(FILLER[i % len(FILLER)], [ID["def"], ID["x"], ID["("]], [FILLER[(i + 3) % 14], ID[":"]])
           for i in range(14)]
    label = label_feature(top, [ID["cat"], ID["dog"], ID["big"]], v)
    assert (label.text, label.rule) == ("context: code", "context_class")


def test_context_words_ranked_by_pmi_against_corpus_frequency():
    freq = [1000] * len(TOKENS)
    freq[ID["banana"]] = 1  # rare in the corpus, frequent around the activations
    v = vocab(freq)
    top = [win(FILLER[i % len(FILLER)], filler(i, 2) + [ID["banana"]], filler(i + 1, 2)) for i in range(14)]
    label = label_feature(top, [ID["cat"], ID["dog"], ID["big"]], v)
    assert (label.text, label.rule) == ('context: "banana"', "context_pmi")
    assert matches(label.predicate, win(ID["cat"], [ID["banana"]]), v)


def test_position_rule_flags_document_start():
    v = vocab()
    top = [win(FILLER[i % len(FILLER)], pos=1) for i in range(12)] + diverse_windows(8)
    label = label_feature(top, [], v)
    assert (label.text, label.rule, label.flags) == ("document start", "position", ("position/BOS",))


def test_fallback_lists_the_top_logit_tokens():
    v = vocab()
    label = label_feature(diverse_windows(14), [ID["cat"], ID["dog"], ID["apple"], ID["big"]], v)
    assert (label.text, label.rule) == ('promotes "cat", "dog", "apple"', "logit_top3")


def test_dead_feature_has_no_label():
    assert label_feature([], [1, 2, 3], vocab()) is None


def test_hostile_tokens_come_out_visible():
    v = vocab()
    label = label_feature([win(ID["\x00"], filler(i)) for i in range(10)], [], v)
    assert "\x00" not in label.text and "\\x00" in label.text


def test_detection_score():
    v = vocab()
    pred = Predicate("token", frozenset(["the"]))
    positives = [win(ID["the"]) for _ in range(4)] + [win(ID["cat"])]
    negatives = [win(ID["The"])] + [win(ID["dog"]) for _ in range(4)]
    s = score_label(pred, positives, negatives, v)
    assert (s.precision, s.recall) == (0.8, 0.8)
    assert s.f1 == pytest.approx(0.8) and not s.weak
    weak = score_label(pred, [win(ID["cat"])] * 3 + [win(ID["the"])], [win(ID["dog"])] * 4, v)
    assert weak.recall == 0.25 and weak.weak
    assert score_label(pred, [], negatives, v) is None
