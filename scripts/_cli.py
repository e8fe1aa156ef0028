"""
What every `python -m scripts.X` command shares: each flag is accepted with dashes or with
underscores (`--train-tokens` and `--train_tokens`), because nanochat's own scripts and the
original SAE extension spell flags with underscores and users' muscle memory follows them.
"""

from __future__ import annotations

import argparse


def flag_adder(parser: argparse.ArgumentParser):
    """add('--foo-bar', '--baz', ...) registers the flags and their underscore spellings; the
    destination is the first flag's name (foo_bar) unless `dest` is given."""
    def add(*flags, **kwargs):
        names = []
        for f in flags:
            for spelling in (f, "--" + f[2:].replace("-", "_")):
                if spelling not in names:
                    names.append(spelling)
        kwargs.setdefault("dest", flags[0][2:].replace("-", "_"))
        return parser.add_argument(*names, **kwargs)
    return add
