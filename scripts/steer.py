"""
Steer a nanochat model along one SAE feature and compare with the unsteered continuation.

    python -m scripts.steer --sae-dir atlas_out_work/saes --prompt "def main():" --layer 2 \
        --feature 123 --strength 8
    python -m scripts.steer ... --clamp 5          # hold the feature at activation 5
    python -m scripts.steer ... --ablate           # remove the feature's contribution
    python -m scripts.steer ... --store atlas_out_work/features.duckdb --html steer.html \
        --atlas-url atlas_out

Both runs use the same seed and sampling settings, so they differ only through the edit.
Prints the two continuations side by side, shaded by the steered feature's activation, and for
every generated token (every token with --all-tokens) the top features that fire at each
attached SAE, labelled when a feature store is given. --html writes the same as one page.

Notable choices
- Every SAE folder under --sae-dir is attached for tracking (--track-layers narrows it); the
  one at --layer (and --hook, if a layer has several) is the one steered.
- The edit is added at the hook point and never replaces the residual with the SAE's
  reconstruction (see sae/runtime.py): steer adds strength·(unit decoder direction), clamp and
  ablate change only that feature's contribution.
- The final generated token is fed through the model too (engine's forward_last), so its
  features are reported like every other token's.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from itertools import zip_longest

from atlas.tokens_display import visible_text
from scripts.sae_viz import (Style, TokenRow, feature_href, load_saes, read_store, render_page,
                             site_keys, terminal_width, token_rows, warn_model_mismatch,
                             write_text)

DEFAULT_STRENGTH = 8.0


@dataclass
class Run:
    name: str
    tokens: list[int]       # prompt + continuation
    n_prompt: int
    traced: list            # sae.runtime.TokenFeatures per position
    focus: list[float]      # the steered feature's activation at every position
    rows: list[TokenRow] = field(default_factory=list)

    @property
    def continuation(self) -> list[TokenRow]:
        return self.rows[self.n_prompt:]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return steer_and_compare(args)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.steer", description=__doc__.split("\n\n")[0])
    p.add_argument("--sae-dir", "--sae_dir", dest="sae_dir", required=True,
                   help="an SAE folder, or a folder holding several (e.g. atlas_out_work/saes)")
    p.add_argument("--prompt", required=True, help="text to continue (BOS is prepended)")
    p.add_argument("--layer", type=int, help="layer of the SAE to steer with "
                   "(optional when --sae-dir holds one SAE)")
    p.add_argument("--hook", help="hook kind when a layer has several SAEs, e.g. resid_post")
    p.add_argument("--feature", type=int, required=True, help="feature index in that SAE")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--strength", type=float,
                      help=f"add strength x the unit decoder direction (default {DEFAULT_STRENGTH})")
    mode.add_argument("--clamp", type=float, help="clamp the feature's activation to this value")
    mode.add_argument("--ablate", action="store_true", help="remove the feature's contribution")
    p.add_argument("--start-pos", "--start_pos", dest="start_pos", type=int, default=0,
                   help="first token position (BOS = 0) the edit applies to (default 0)")
    p.add_argument("--max-tokens", "--max_tokens", dest="max_tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default 0.6)")
    p.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=50,
                   help="sample from the top k tokens; 0 = all (default 50)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--top-n", "--top_n", dest="top_n", type=int, default=5,
                   help="features listed per token and SAE (default 5)")
    p.add_argument("--track-layers", "--track_layers", dest="track_layers",
                   help="comma-separated layers whose SAEs report features (default: all)")
    p.add_argument("--all-tokens", "--all_tokens", dest="all_tokens", action="store_true",
                   help="list the prompt tokens' features too")
    p.add_argument("--store", help="features.duckdb to read labels (and atlas page keys) from")
    p.add_argument("--html", help="also write the comparison as one HTML page here")
    p.add_argument("--atlas-url", "--atlas_url", dest="atlas_url",
                   help="base URL or path of the atlas site, to link features to their pages")
    p.add_argument("--checkpoint", help="nanochat checkpoint dir or model_<step>.pt "
                   "(default: latest under $NANOCHAT_BASE_DIR, else the demo model)")
    p.add_argument("--device", help="cuda | mps | cpu (default: autodetect)")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="ANSI colour (auto: only on a terminal without NO_COLOR)")
    p.add_argument("--quiet", action="store_true", help="no progress output while loading")
    return p


def steer_and_compare(args) -> int:
    from nanochat.common import autodetect_device
    from nanochat.model_source import resolve_model
    from sae.runtime import SAERuntime, ablate, clamp, steer

    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    device = autodetect_device(args.device)
    saes = load_saes(args.sae_dir, device)
    target = pick_sae(saes, args.layer, args.hook)
    sae = saes[target]
    if not 0 <= args.feature < sae.cfg.d_sae:
        raise ValueError(f"--feature {args.feature} out of range for {target} (d_sae={sae.cfg.d_sae})")
    tracked = tracked_saes(saes, args.track_layers, target)
    labels, keys = read_store(args.store, list(saes)) if args.store else ({}, {})
    keys = site_keys(saes, keys)
    source = resolve_model(args.checkpoint, device, quiet=args.quiet)
    warn_model_mismatch(saes, source.model_id)
    tokenizer = source.tokenizer
    prompt = tokenizer.encode(args.prompt, prepend=tokenizer.get_bos_token_id())
    specials = tokenizer.get_special_tokens()
    stop = [specials[s] for s in ("<|bos|>", "<|assistant_end|>") if s in specials]

    if args.ablate:
        edit = ablate(target, args.feature, args.start_pos)
        what = f"ablate (clamp to 0) from position {args.start_pos}"
    elif args.clamp is not None:
        edit = clamp(target, args.feature, args.clamp, args.start_pos)
        what = f"clamp to {args.clamp:g} from position {args.start_pos}"
    else:
        strength = DEFAULT_STRENGTH if args.strength is None else args.strength
        edit = steer(target, args.feature, strength, args.start_pos)
        what = f"add {strength:+g} × unit decoder direction from position {args.start_pos}"

    runtime = SAERuntime(source.model, saes, labels=labels)
    with runtime:
        for sae_id in tracked:
            runtime.track(sae_id, top_n=args.top_n, watch=[args.feature] if sae_id == target else [])
        plain = generate_run(runtime, "unsteered", prompt, target, args, stop)
        runtime.add(edit)
        steered = generate_run(runtime, "steered", prompt, target, args, stop)

    scale = max(max(plain.focus, default=0.0), max(steered.focus, default=0.0))
    for run in (plain, steered):
        run.rows = token_rows(tokenizer, run.tokens, run.traced, run.focus, run.n_prompt, keys,
                              args.atlas_url, (target, args.feature), scale=scale)

    label = labels.get(target, {}).get(args.feature)
    sampling = (f"seed {args.seed}, temperature {args.temperature:g}, top_k {args.top_k or 'off'}, "
                f"max {args.max_tokens} tokens")
    style = Style.for_stream(sys.stdout, args.color)
    print_report(style, args, target, label, what, sampling, source.model_id, plain, steered)
    if args.html:
        page = render_page(
            "steer.html", title=f"steer {target} f{args.feature}", sae_id=target,
            feature=args.feature, feature_label=visible_text(label) if label else None,
            feature_href=feature_href(args.atlas_url, keys[target], args.feature),
            intervention=what, model=visible_text(f"{source.model_id} ({source.kind})"),
            sampling=sampling, prompt=visible_text(args.prompt), scale=scale, runs=[plain, steered])
        write_text(args.html, page)
        print(f"\nwrote {args.html}")
    return 0


def generate_run(runtime, name: str, prompt: list[int], target: str, args, stop) -> Run:
    """One generation with the runtime's current edits; features of every token traced."""
    import torch

    from nanochat.common import autocast
    from nanochat.engine import generate

    model = runtime.model
    with torch.inference_mode(), autocast(model.get_device()):
        continuation = list(generate(model, prompt, args.max_tokens, temperature=args.temperature,
                                     top_k=args.top_k, seed=args.seed, stop_tokens=stop,
                                     forward_last=True))
    traced = runtime.token_features()
    focus = runtime.watched(target)[1][:, 0].tolist()
    return Run(name, prompt + continuation, len(prompt), traced, focus)


def pick_sae(saes: dict, layer: int | None, hook: str | None) -> str:
    """The SAE to steer with: the one at `layer` (and `hook`), or the only one."""
    kind = None if hook is None else (hook if hook.startswith("hook_") else f"hook_{hook}")
    found = [s for s, sae in saes.items()
             if (layer is None or sae.cfg.layer == layer) and (kind is None or s.endswith("." + kind))]
    if len(found) == 1:
        return found[0]
    available = ", ".join(sorted(saes))
    if not found:
        raise ValueError(f"no SAE for layer {layer}{f' hook {kind}' if kind else ''}; "
                         f"available: {available}")
    flag = "--layer" if layer is None else "--hook"
    raise ValueError(f"several SAEs match ({', '.join(found)}); choose one with {flag}")


def tracked_saes(saes: dict, track_layers: str | None, target: str) -> list[str]:
    if not track_layers:
        return list(saes)
    try:
        layers = {int(x) for x in track_layers.split(",") if x.strip()}
    except ValueError:
        raise ValueError(f"--track-layers must be comma-separated integers, got {track_layers!r}") from None
    chosen = [s for s, sae in saes.items() if sae.cfg.layer in layers]
    missing = layers - {saes[s].cfg.layer for s in chosen}
    if missing:
        raise ValueError(f"--track-layers {sorted(missing)}: no SAE at those layers; "
                         f"available: {sorted({sae.cfg.layer for sae in saes.values()})}")
    return chosen if target in chosen else [target, *chosen]  # the steered SAE always reports


def print_report(style: Style, args, target, label, what, sampling, model_id, plain: Run,
                 steered: Run) -> None:
    title = f"feature {args.feature} of {target}"
    print(style.bold(f"steering {visible_text(title)}") + (f" “{visible_text(label)}”" if label else ""))
    print(f"{what}; {sampling}; model {visible_text(model_id)}")
    print(style.dim("prompt: ") + style.tokens(plain.rows[:plain.n_prompt]))
    print()
    width = max(20, (terminal_width() - 3) // 2)
    print(side_by_side(style, plain, steered, width))
    for run in (plain, steered):
        print()
        print(style.bold(f"{run.name}: features per token"))
        print(style.feature_table(run.rows, only_generated=not args.all_tokens))


def side_by_side(style: Style, left: Run, right: Run, width: int) -> str:
    """Two continuations in columns of `width` characters, wrapped at token boundaries."""
    a, b = wrap(left.continuation, width), wrap(right.continuation, width)
    lines = [style.bold(left.name.ljust(width)) + " │ " + style.bold(right.name)]
    for la, lb in zip_longest(a, b, fillvalue=[]):
        used = sum(len(t) for _, t in la)
        lines.append("".join(style.token(r, t) for r, t in la) + " " * (width - used) + " │ "
                     + "".join(style.token(r, t) for r, t in lb))
    return "\n".join(lines)


def wrap(rows: list[TokenRow], width: int) -> list[list[tuple[TokenRow, str]]]:
    """Lines of (row, text piece), each at most `width` characters; long tokens are split."""
    lines, line, used = [], [], 0
    for row in rows:
        text = row.plain
        while text:
            room = width - used
            if len(text) > room and used > 0 and len(text) <= width:
                lines.append(line)
                line, used = [], 0
                continue
            piece, text = text[:room], text[room:]
            line.append((row, piece))
            used += len(piece)
            if used >= width:
                lines.append(line)
                line, used = [], 0
    if line or not lines:
        lines.append(line)
    return lines


if __name__ == "__main__":
    sys.exit(main())
