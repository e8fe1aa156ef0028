"""scripts/steer.py and scripts/sae_viz.py end to end, on a nanochat-format checkpoint of our own."""

import io
import json
from pathlib import Path

import pytest
import torch

from atlas_fixtures import make_store
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from sae.config import SAEConfig
from sae.io import save_sae
from sae.models import build_sae
from scripts import sae_viz, steer

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
L1 = "blocks.1.hook_resid_post"
L0 = "blocks.0.hook_resid_post"
WORDS = ("def return self import class value data model layer token feature python "
         "list dict string number error print while for in if else the of and to").split()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny nanochat base dir (checkpoint + tokenizer), two SAEs, a store and a corpus."""
    root = tmp_path_factory.mktemp("steer")
    text = " ".join(f"{WORDS[i % len(WORDS)]} {WORDS[(i * 7) % len(WORDS)]}{i % 13}" for i in range(600))
    tok = Tokenizer.train_from_iterator(iter([text] * 3), 300)
    tok.save(root / "base" / "tokenizer")
    torch.manual_seed(0)  # PyTorch's default init: unlike nanochat's, lm_head is not zero
    cfg = GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    ckpt = root / "base" / "base_checkpoints" / "d2"
    save_checkpoint(ckpt, 1, GPT(cfg).state_dict(), {"step": 1, "model_config": cfg.__dict__})
    for layer, hook in ((0, L0), (1, L1)):
        sae = build_sae(SAEConfig(d_in=32, d_sae=64, architecture="topk", k=8, hook_name=hook),
                        torch.Generator().manual_seed(layer))
        save_sae(sae, root / "saes" / hook)
    store = make_store(root / "features.duckdb", saes=((L0, 0, "hook_resid_post"),
                                                        (L1, 1, "hook_resid_post")), n_features=64)
    corpus = root / "corpus.jsonl"
    lines = [json.dumps({"text": " ".join(WORDS[(d + j) % len(WORDS)] for j in range(40))})
             for d in range(60)]
    corpus.write_text("\n".join(lines) + "\n")
    return {"root": root, "ckpt": ckpt, "saes": root / "saes", "store": store, "corpus": corpus}


def run_steer(world, capsys, *extra):
    args = ["--sae-dir", str(world["saes"]), "--checkpoint", str(world["ckpt"]),
            "--prompt", "def value(self):", "--layer", "1", "--feature", "0",
            "--max-tokens", "12", "--device", "cpu", "--color", "never", *extra]
    rc = steer.main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def columns(out: str) -> list[tuple[str, str]]:
    """The side-by-side block: (left, right) per line, header first."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("unsteered") and "│" in line)
    block = []
    for line in lines[start:]:
        if "│" not in line:
            break
        left, right = line.split(" │ ", 1)
        block.append((left.rstrip(), right.rstrip()))
    return block


def test_steer_prints_both_continuations_and_labelled_features(world, capsys):
    rc, out, err = run_steer(world, capsys, "--strength", "30", "--store", str(world["store"]),
                             "--all-tokens")
    assert rc == 0, err
    block = columns(out)
    assert block[0] == ("unsteered", "steered")
    assert len(block) >= 2
    assert "unsteered: features per token" in out and "steered: features per token" in out
    assert "L1/f0" in out and "L0/f" in out  # both SAEs report; the steered feature shows up
    # the hostile label (feature 0) reaches the terminal only as visible text
    assert "\x00" not in out and "\u202e" not in out and "\\x00" in out
    assert "\x1b" not in out


def test_strength_zero_gives_identical_continuations(world, capsys):
    rc, out, _ = run_steer(world, capsys, "--strength", "0", "--temperature", "1.0")
    assert rc == 0
    block = columns(out)
    assert all(left == right for left, right in block[1:])
    rc, out, _ = run_steer(world, capsys, "--strength", "60", "--temperature", "0")
    assert any(left != right for left, right in columns(out)[1:])


def test_seeded_runs_repeat_exactly(world, capsys):
    first = run_steer(world, capsys, "--seed", "7", "--temperature", "1.0")
    second = run_steer(world, capsys, "--seed", "7", "--temperature", "1.0")
    assert first[0] == 0 and first[1] == second[1]


def test_clamp_and_ablate(world, capsys):
    rc, out, _ = run_steer(world, capsys, "--clamp", "3", "--start-pos", "2")
    assert rc == 0 and "clamp to 3 from position 2" in out
    rc, out, _ = run_steer(world, capsys, "--ablate")
    assert rc == 0 and "ablate" in out
    with pytest.raises(SystemExit):
        run_steer(world, capsys, "--ablate", "--clamp", "2")


def test_html_page_is_escaped_and_links_into_the_atlas(world, capsys, tmp_path):
    page = tmp_path / "out" / "steer.html"
    rc, out, err = run_steer(world, capsys, "--strength", "30", "--store", str(world["store"]),
                             "--html", str(page), "--atlas-url", "https://example.org/atlas/")
    assert rc == 0, err
    html = page.read_text()
    assert 'href="https://example.org/atlas/layers/1/features/0.html"' in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # the hostile label, escaped
    assert "<script" not in html.lower()
    assert "Content-Security-Policy" in html
    assert html.count("<h2>") == 4  # two continuations, two per-token tables
    assert 'class="a8' in html  # the steered feature at its max gets the darkest shade
    assert f"wrote {page}" in out


def test_bad_layer_feature_and_paths_are_named(world, capsys):
    rc, _, err = run_steer(world, capsys, "--layer", "5")
    assert rc == 2 and "no SAE for layer 5" in err and L1 in err
    rc, _, err = run_steer(world, capsys, "--feature", "64")
    assert rc == 2 and "--feature 64 out of range" in err
    rc = steer.main(["--sae-dir", str(world["root"] / "nope"), "--prompt", "x", "--feature", "1",
                     "--checkpoint", str(world["ckpt"]), "--device", "cpu"])
    assert rc == 2 and "nope" in capsys.readouterr().err
    rc, _, err = run_steer(world, capsys, "--track-layers", "1,9")
    assert rc == 2 and "--track-layers [9]" in err


def test_colour_follows_the_terminal_and_no_color(world, capsys, monkeypatch):
    rc, out, _ = run_steer(world, capsys, "--color", "always", "--strength", "30")
    assert rc == 0 and "\x1b[" in out

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert sae_viz.Style.for_stream(Terminal()).color
    assert not sae_viz.Style.for_stream(io.StringIO()).color
    monkeypatch.setenv("NO_COLOR", "1")
    assert not sae_viz.Style.for_stream(Terminal()).color


def test_sae_viz_prompt_terminal_and_html(world, capsys, tmp_path):
    page = tmp_path / "viz.html"
    prompt = "value <b>data</b> \u202e model"
    rc = sae_viz.main(["--sae", str(world["saes"] / L1), "--prompt", prompt, "--feature", "3",
                       "--checkpoint", str(world["ckpt"]), "--device", "cpu", "--color", "never",
                       "--store", str(world["store"]), "--html", str(page),
                       "--atlas-url", "../site"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "shading: feature 3" in out and "\u202e" not in out
    html = page.read_text()
    assert "&lt;b&gt;" in html and "<b>data" not in html and "\u202e" not in html
    assert 'href="../site/layers/1/features/' in html
    n_tokens = len(Tokenizer.from_directory(world["root"] / "base" / "tokenizer").encode(prompt)) + 1
    assert html.count("<tr class=") == n_tokens


def test_sae_viz_refuses_a_folder_of_several_saes(world, capsys):
    rc = sae_viz.main(["--sae", str(world["saes"]), "--prompt", "x",
                       "--checkpoint", str(world["ckpt"]), "--device", "cpu"])
    assert rc == 2 and "must be one SAE folder" in capsys.readouterr().err


def test_sae_viz_all_features_builds_the_atlas_for_one_sae(world, capsys, tmp_path):
    out = tmp_path / "one"
    rc = sae_viz.main(["--sae_path", str(world["saes"] / L1), "--all_features",
                       "--output_dir", str(out), "--checkpoint", str(world["ckpt"]),
                       "--data", str(world["corpus"]), "--tokens", "400", "--device", "cpu",
                       "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert (out / "site" / "index.html").is_file()
    assert (out / "site" / "layers" / "1" / "features" / "0.html").is_file()
    import duckdb
    con = duckdb.connect(str(out / "features.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM features WHERE sae_id = ?", [L1]).fetchone()[0] == 64
    finally:
        con.close()


def test_steer_on_the_fixture_checkpoint(tmp_path, capsys):
    base = FIXTURES / "nanochat_d4"
    if not base.is_dir():
        pytest.skip(f"fixture checkpoint not found: {base} (clone ../shared next to the repo)")
    cfg = SAEConfig(d_in=256, d_sae=512, architecture="topk", k=16,
                    hook_name="blocks.2.hook_resid_post")
    sae = build_sae(cfg, torch.Generator().manual_seed(0))
    save_sae(sae, tmp_path / "saes" / "blocks.2.hook_resid_post")
    rc = steer.main(["--sae-dir", str(tmp_path / "saes"), "--checkpoint",
                     str(base / "base_checkpoints" / "d4"), "--prompt", "import os\n",
                     "--layer", "2", "--feature", "17", "--strength", "2000", "--max-tokens", "8",
                     "--temperature", "0", "--device", "cpu", "--color", "never"])
    out = capsys.readouterr().out
    assert rc == 0
    block = columns(out)
    assert block[0] == ("unsteered", "steered")
    assert any(left != right for left, right in block[1:])  # a strong steer changes the text
    steered_table = out.split("steered: features per token")[-1]
    assert "L2/f17" in steered_table  # and the steered feature fires on what it generated
