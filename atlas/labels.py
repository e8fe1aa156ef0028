"""
Offline, rule-based feature labels and their offline detection score (spec §6.3): a no-LLM
stand-in for Neuronpedia's `np_max-act-logits` explainer.

The cascade, first rule that fires wins (thresholds are the module constants):
  0. position   more than half of the top examples sit at document position <= 1:
                "document start", flagged position/BOS (the max tokens are then incidental).
  1. max token  the folded token at the maximum covers >= 50% of the top examples: "the"
                (with "the" after "of" when one preceding token dominates), or the three most
                common cover >= 80%: "a"/"b"/"c". Else a lexical class shared by >= 70% of the
                max tokens: digits, whitespace, newlines, punctuation, capitalised, a non-Latin script.
  2. next token the token after the maximum is one folded token >= 50% (say "x") or shares a
                class >= 70%: same first letter, digits, closing punctuation, newline.
  3. logits     the top 10 positive logit tokens share a class: a common prefix or suffix of
                >= 3 characters, all numeric, all capitalised, one non-Latin script, one lemma
                (lower-cased, s/ed/ing stripped): promotes <class>: a, b, c.
  4. context    >= 70% of the ±8-token windows look like code, a URL or math ("context: code"),
                else unigrams ranked by PMI (activation-weighted presence in the windows against
                their corpus frequency), kept if in >= 25% of the windows: "context: w1, w2, w3".
  5. fallback   the top 3 logit tokens: "promotes a, b, c".
Folding = decode with replacement, strip whitespace, lower-case; a token that is only
whitespace keeps its visible form ('↵', '·').

Every label carries a `Predicate` on a token window. `score_label` runs it as a detector on
held-out activating windows (the interval samples, drawn across quantile bins) and as many random
windows where the feature is zero: precision, recall and F1, stored next to the label. F1 below
WEAK_F1 marks the label weak. Bigram PMI is not computed: it would need corpus bigram counts.

All functions are pure; strings from the corpus are returned as visible text (tokens_display),
never as markup.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from atlas.tokens_display import visible_token, visible_text

POSITION_SHARE = 0.5
TOKEN_SHARE = 0.5
TOP3_SHARE = 0.8
PREV_SHARE = 0.5
CLASS_SHARE = 0.7
CONTEXT_RADIUS = 8
PMI_SUPPORT = 0.25
PMI_MIN = math.log(4.0)
WEAK_F1 = 0.5
N_LOGITS = 10

_CLOSE_PUNCT = set(")]}>\"'.,;:!?»”’")
_CODE_RE = re.compile(r"[{};]|\b(def|return|import|class|function|var|let|const|elif|self|None|"
                      r"null|true|false|print)\b|==|!=|=>|->|\+\+|::")
_URL_RE = re.compile(r"https?:|www\.|://|\.(com|org|net|io|html?)\b")
_MATH_RE = re.compile(r"\\[a-zA-Z]+|\$|\^|_\{|\d\s*[-+*/=<>^]\s*\d|[∑∫√≤≥≈±×÷∞]")
_WINDOW_CLASSES = (("code", _CODE_RE), ("url", _URL_RE), ("math", _MATH_RE))


@dataclass(frozen=True)
class Window:
    """A token window: ids (BOS included when the window reaches it) around tokens[center]."""
    tokens: tuple[int, ...]
    center: int
    token_pos: int      # document position of tokens[center] (BOS = 0)
    act: float = 0.0    # the feature's activation at the center


@dataclass(frozen=True)
class Predicate:
    """kind: position | token | token_class | next_token | next_class | window_class | window_words."""
    kind: str
    tokens: frozenset = frozenset()   # folded forms (token, next_token, window_words)
    prev: str | None = None           # folded preceding token (token)
    cls: str | None = None            # class name (token_class, next_class, window_class)


@dataclass(frozen=True)
class Label:
    text: str
    rule: str
    predicate: Predicate
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Score:
    precision: float
    recall: float
    f1: float
    n_pos: int
    n_neg: int

    @property
    def weak(self) -> bool:
        return self.f1 < WEAK_F1


@dataclass
class Vocab:
    """Folded text and display form of every token, computed once per vocabulary."""
    token_bytes: list[bytes]
    bos_id: int
    token_freq: list[int] | None = None  # corpus counts per token id, for PMI
    fold: list[str] = field(init=False)
    text: list[str] = field(init=False)
    fold_freq: Counter = field(init=False)
    total: int = field(init=False)

    def __post_init__(self):
        self.text = [b.decode("utf-8", errors="replace") for b in self.token_bytes]
        self.fold = [fold_text(t, b) for t, b in zip(self.text, self.token_bytes)]
        self.fold_freq = Counter()
        if self.token_freq is not None:
            for form, n in zip(self.fold, self.token_freq):
                if n:
                    self.fold_freq[form] += int(n)
        self.total = max(1, sum(self.fold_freq.values()))

    def folded(self, token_id: int) -> str | None:
        return self.fold[token_id] if 0 <= token_id < len(self.fold) else None


def fold_text(text: str, raw: bytes) -> str:
    folded = text.strip().lower()
    return folded if folded else visible_token(raw)


# ----------------------------------------------------------------------------- labelling

def label_feature(top: list[Window], logit_tokens: list[int], vocab: Vocab) -> Label | None:
    """The cascade's label for a feature from its top examples (best first) and its top positive
    logit tokens (best first); None for a feature with no examples (dead)."""
    if not top:
        return None
    for rule in (_position_rule, _max_token_rule, _next_token_rule):
        label = rule(top, vocab)
        if label is not None:
            return label
    label = _logit_class_rule(logit_tokens, vocab)
    if label is not None:
        return label
    label = _context_rule(top, vocab)
    if label is not None:
        return label
    shown = [_quote(vocab.fold[t]) for t in logit_tokens[:3]]
    return Label("promotes " + ", ".join(shown), "logit_top3",
                 Predicate("next_token", frozenset(vocab.fold[t] for t in logit_tokens[:N_LOGITS])))


def _position_rule(top, vocab):
    early = sum(1 for w in top if w.token_pos <= 1 or w.tokens[w.center] == vocab.bos_id)
    if early / len(top) > POSITION_SHARE:
        return Label("document start", "position", Predicate("position"), ("position/BOS",))
    return None


def _max_token_rule(top, vocab):
    forms = [vocab.fold[w.tokens[w.center]] for w in top]
    counts = Counter(forms).most_common()
    n = len(forms)
    if counts[0][1] / n >= TOKEN_SHARE:
        form = counts[0][0]
        prevs = [_token_at(w, w.center - 1, vocab) for w in top if vocab.fold[w.tokens[w.center]] == form]
        prev, k = Counter(prevs).most_common(1)[0]
        if prev is not None and k / len(prevs) >= PREV_SHARE and len(prevs) >= 2:
            return Label(f"{_quote(form)} after {_quote(prev)}", "max_token_bigram",
                         Predicate("token", frozenset([form]), prev=prev))
        return Label(_quote(form), "max_token", Predicate("token", frozenset([form])))
    top3 = counts[:3]
    if len(top3) > 1 and sum(c for _, c in top3) / n >= TOP3_SHARE:
        return Label("/".join(_quote(f) for f, _ in top3), "max_token",
                     Predicate("token", frozenset(f for f, _ in top3)))
    cls = _shared_class([vocab.text[w.tokens[w.center]] for w in top], _CENTER_CLASSES)
    if cls is not None:
        return Label(_class_name(cls), "max_token_class", Predicate("token_class", cls=cls))
    return None


def _next_token_rule(top, vocab):
    nexts = [w for w in top if w.center + 1 < len(w.tokens)]
    if len(nexts) < max(2, len(top) // 2):
        return None
    forms = [vocab.fold[w.tokens[w.center + 1]] for w in nexts]
    form, k = Counter(forms).most_common(1)[0]
    if k / len(forms) >= TOKEN_SHARE:
        return Label(f"say {_quote(form)}", "next_token", Predicate("next_token", frozenset([form])))
    cls = _shared_class([vocab.text[w.tokens[w.center + 1]] for w in nexts], _NEXT_CLASSES,
                        first_letter=True)
    if cls is not None:
        return Label(f"say {_class_name(cls)}", "next_token_class", Predicate("next_class", cls=cls))
    return None


def _logit_class_rule(logit_tokens, vocab):
    tokens = logit_tokens[:N_LOGITS]
    if len(tokens) < 3:
        return None
    texts = [vocab.text[t] for t in tokens]
    forms = [vocab.fold[t] for t in tokens]
    shown = ", ".join(_quote(f) for f in forms[:3])
    cls = _shared_class(texts, _LOGIT_CLASSES, share=1.0)
    if cls is None:
        cls = _shared_affix(forms)
    if cls is None:
        lemmas = {_lemma(f) for f in forms}
        if len(lemmas) == 1 and len(next(iter(lemmas))) >= 2:
            cls = "lemma:" + lemmas.pop()
    if cls is None:
        return None
    return Label(f"promotes {_class_name(cls)}: {shown}", "logit_class", Predicate("next_class", cls=cls))


def _context_rule(top, vocab):
    texts = [_context_text(w, vocab) for w in top]
    for name, rx in _WINDOW_CLASSES:
        if sum(1 for t in texts if rx.search(t)) / len(texts) >= CLASS_SHARE:
            return Label(f"context: {_class_name('window:' + name)}", "context_class",
                         Predicate("window_class", cls=name))
    if vocab.token_freq is None:
        return None
    weight: Counter = Counter()
    support: Counter = Counter()
    max_act = max(w.act for w in top) or 1.0
    for w in top:
        for form in set(_context_forms(w, vocab)):
            if any(ch.isalnum() for ch in form) and len(form) >= 2:
                weight[form] += w.act / max_act
                support[form] += 1
    total_weight = sum(w.act / max_act for w in top) or 1.0
    span = 2 * CONTEXT_RADIUS + 1
    scored = []
    for form, wsum in weight.items():
        if support[form] < max(2, PMI_SUPPORT * len(top)):
            continue
        p_window = min(1.0, span * (vocab.fold_freq.get(form, 0) + 0.5) / vocab.total)
        pmi = math.log((wsum / total_weight) / p_window)
        if pmi >= PMI_MIN:
            scored.append((-pmi, form))
    if not scored:
        return None
    words = [form for _, form in sorted(scored)[:3]]
    return Label("context: " + ", ".join(_quote(f) for f in words), "context_pmi",
                 Predicate("window_words", frozenset(words)))


# ----------------------------------------------------------------------------- scoring

def matches(pred: Predicate, w: Window, vocab: Vocab) -> bool:
    """Does the predicate hold on window w (at its center)?"""
    kind = pred.kind
    if kind == "position":
        return w.token_pos <= 1 or w.tokens[w.center] == vocab.bos_id
    if kind == "token":
        if vocab.fold[w.tokens[w.center]] not in pred.tokens:
            return False
        return pred.prev is None or _token_at(w, w.center - 1, vocab) == pred.prev
    if kind == "token_class":
        return has_class(vocab.text[w.tokens[w.center]], pred.cls)
    if kind in ("next_token", "next_class"):
        if w.center + 1 >= len(w.tokens):
            return False
        nxt = w.tokens[w.center + 1]
        if kind == "next_token":
            return vocab.fold[nxt] in pred.tokens
        return has_class(vocab.text[nxt], pred.cls)
    if kind == "window_class":
        return dict(_WINDOW_CLASSES)[pred.cls].search(_context_text(w, vocab)) is not None
    if kind == "window_words":
        return not pred.tokens.isdisjoint(_context_forms(w, vocab))
    raise ValueError(f"unknown predicate kind {kind!r}")


def score_label(pred: Predicate, positives: list[Window], negatives: list[Window],
                vocab: Vocab) -> Score | None:
    """Detection precision/recall/F1 of the predicate; None without positives."""
    if not positives:
        return None
    tp = sum(matches(pred, w, vocab) for w in positives)
    fp = sum(matches(pred, w, vocab) for w in negatives)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / len(positives)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return Score(precision, recall, f1, len(positives), len(negatives))


# ----------------------------------------------------------------------------- classes

def has_class(text: str, cls: str) -> bool:
    """Lexical classes of one token's text (see the module docstring)."""
    s = text.strip()
    if cls == "digits":
        return s.isdigit()
    if cls == "whitespace":
        return text != "" and s == ""
    if cls == "newline":
        return "\n" in text
    if cls == "punct":
        return s != "" and all(unicodedata.category(c).startswith("P") or c in "$+<=>^`|~" for c in s)
    if cls == "close_punct":
        return s != "" and s[0] in _CLOSE_PUNCT
    if cls == "capitalised":
        return s[:1].isupper() and s[:1].isalpha()
    if cls.startswith("script:"):
        return _script(s) == cls[7:]
    if cls.startswith("first:"):
        return s.lower().startswith(cls[6:])
    if cls.startswith("prefix:"):
        return s.lower().startswith(cls[7:])
    if cls.startswith("suffix:"):
        return s.lower().endswith(cls[7:])
    if cls.startswith("lemma:"):
        return _lemma(s.lower()) == cls[6:]
    raise ValueError(f"unknown token class {cls!r}")


_CENTER_CLASSES = ("digits", "newline", "whitespace", "punct", "capitalised")
_NEXT_CLASSES = ("digits", "close_punct", "newline")
_LOGIT_CLASSES = ("digits", "capitalised")


def _shared_class(texts: list[str], classes, share: float = CLASS_SHARE,
                  first_letter: bool = False) -> str | None:
    for cls in classes:
        if sum(has_class(t, cls) for t in texts) / len(texts) >= share:
            return cls
    scripts = Counter(_script(t.strip()) for t in texts)
    script, k = scripts.most_common(1)[0]
    if script not in (None, "LATIN") and k / len(texts) >= share:
        return "script:" + script
    if first_letter:
        firsts = Counter(t.strip().lower()[:1] for t in texts if t.strip()[:1].isalpha())
        if firsts:
            first, k = firsts.most_common(1)[0]
            if k / len(texts) >= share:
                return "first:" + first
    return None


def _shared_affix(forms: list[str]) -> str | None:
    prefix = _common_prefix(forms)
    if len(prefix) >= 3:
        return "prefix:" + prefix
    suffix = _common_prefix([f[::-1] for f in forms])[::-1]
    if len(suffix) >= 3:
        return "suffix:" + suffix
    return None


def _common_prefix(items: list[str]) -> str:
    first, last = min(items), max(items)
    i = 0
    while i < min(len(first), len(last)) and first[i] == last[i]:
        i += 1
    return first[:i]


def _lemma(form: str) -> str:
    for suffix in ("ing", "ed", "s"):
        if form.endswith(suffix) and len(form) > len(suffix) + 1:
            return form[: -len(suffix)]
    return form


def _script(s: str) -> str | None:
    """The Unicode script of the letters of s when they share one ('LATIN', 'CYRILLIC', ...)."""
    scripts = set()
    for ch in s:
        if ch.isalpha():
            try:
                scripts.add(unicodedata.name(ch).split()[0])
            except ValueError:
                return None
    return scripts.pop() if len(scripts) == 1 else None


def _class_name(cls: str) -> str:
    fixed = {"digits": "digits", "newline": "newline", "whitespace": "whitespace",
             "punct": "punctuation", "close_punct": "closing punctuation",
             "capitalised": "capitalised words", "window:code": "code", "window:url": "URLs",
             "window:math": "math"}
    if cls in fixed:
        return fixed[cls]
    kind, _, value = cls.partition(":")
    if kind == "script":
        return f"{value.title()} script"
    if kind == "first":
        return f"a word starting with {_quote(value)}"
    return f"{kind} {_quote(value)}"


# ----------------------------------------------------------------------------- windows

def _token_at(w: Window, i: int, vocab: Vocab) -> str | None:
    if 0 <= i < len(w.tokens) and w.tokens[i] != vocab.bos_id:
        return vocab.fold[w.tokens[i]]
    return None


def _context_ids(w: Window, vocab: Vocab) -> list[int]:
    lo, hi = max(0, w.center - CONTEXT_RADIUS), min(len(w.tokens), w.center + CONTEXT_RADIUS + 1)
    return [t for t in w.tokens[lo:hi] if t != vocab.bos_id]


def _context_text(w: Window, vocab: Vocab) -> str:
    return "".join(vocab.text[t] for t in _context_ids(w, vocab))


def _context_forms(w: Window, vocab: Vocab) -> list[str]:
    return [vocab.fold[t] for t in _context_ids(w, vocab)]


def _quote(form: str) -> str:
    return '"' + visible_text(form) + '"'
