"""scripts.sae_train and scripts.sae_eval end to end on the d4 fixture, PR #169 flag spellings included."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sae.io import load_sae
from scripts import sae_eval, sae_train

ROOT = Path(__file__).resolve().parents[1]
D4 = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "nanochat_d4"
MODEL_FILE = D4 / "base_checkpoints" / "d4" / "model_000150.pt"


@pytest.fixture
def d4():
    if not D4.exists():
        pytest.skip(f"nanochat fixtures not found at {D4} (they sit beside the checkout as ../shared/fixtures)")
    return D4


def write_corpus(path: Path) -> Path:
    docs = [f"class Widget{i}:\n    def area(self):\n        return self.w * {i} + self.h" for i in range(30)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


def test_legacy_flags_map_onto_the_run_config():
    args = sae_train.build_parser().parse_args([
        "--checkpoint", "x/model_000650.pt", "--layer", "10", "--hook_type", "mlp", "--expansion_factor", "4",
        "--activation", "topk", "--k", "64", "--num_activations", "1000", "--num_epochs", "3",
        "--learning_rate", "1e-3", "--batch_size", "128", "--output_dir", "sae_outputs", "--l1_coefficient", "0.1",
        "--device=cpu"])
    cfg = sae_train.run_config(args)
    assert (cfg.layers, cfg.hook, cfg.expansion, cfg.architecture, cfg.k) == ([10], "mlp_out", 4.0, "topk", 64)
    assert (cfg.tokens, cfg.lr, cfg.batch_size, cfg.out, cfg.device) == (3000, 1e-3, 128, "sae_outputs", "cpu")
    assert cfg.checkpoint == "x/model_000650.pt" and cfg.l1_coefficient == 0.1
    new = sae_train.run_config(sae_train.build_parser().parse_args(["--layers", "4,10,16", "--hook", "hook_resid_pre"]))
    assert new.layers == [4, 10, 16] and new.hook == "resid_pre" and new.architecture == "batchtopk"
    with pytest.raises(ValueError, match="--layers"):
        sae_train.run_config(sae_train.build_parser().parse_args(["--layers", "4,x"]))


def test_train_then_eval_end_to_end(d4, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "saes"
    cmd = [sys.executable, "-m", "scripts.sae_train", "--checkpoint", str(MODEL_FILE), "--layer", "1,3",
           "--data", str(corpus), "--output_dir", str(out), "--num_activations", "1024", "--batch_size", "128",
           "--expansion_factor", "2", "--k", "8", "--seq-len", "32", "--eval-tokens", "32", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    for expected in ("model:", "nanochat-d4", "SAEs:", "batchtopk", "tokens:", "1,024 training", "output:",
                     "blocks.3.hook_resid_post", "ΔCE"):
        assert expected in run.stderr
    for layer in (1, 3):
        folder = out / f"blocks.{layer}.hook_resid_post"
        assert {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "eval.json",
                "training_state.pt"} <= {p.name for p in folder.iterdir()}
        sae = load_sae(folder)
        assert (sae.cfg.hook_name, sae.cfg.d_in, sae.cfg.d_sae) == (f"blocks.{layer}.hook_resid_post", 256, 512)
        report = json.loads((folder / "eval.json").read_text())
        assert report["training"]["tokens"] == 1024
        assert report["val"]["split"] == "val" and report["val"]["n_tokens"] >= 32
        assert report["val"]["ce_spliced"] > report["val"]["ce_clean"]  # a 1k-token SAE is far from perfect
    assert (out / "checkpoint.pt").exists()

    # the same command again refuses to overwrite; with --resume it finds the finished run
    assert sae_train.main(cmd[3:]) == 2
    assert "--resume" in capsys.readouterr().err
    assert sae_train.main(cmd[3:] + ["--resume", "--quiet", "--eval-tokens", "0"]) == 0

    rc = sae_eval.main(["--sae_dir", str(out), "--tokens", "20", "--seq-len", "32", "--data", str(corpus),
                        "--json", str(tmp_path / "eval.json"), "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "ΔCE" in printed and "blocks.1.hook_resid_post" in printed and "blocks.3.hook_resid_post" in printed
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert [r["sae"] for r in results] == ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]
    assert all(r["n_tokens"] >= 20 and r["delta_ce"] == r["ce_spliced"] - r["ce_clean"] for r in results)
    merged = json.loads((out / "blocks.1.hook_resid_post" / "eval.json").read_text())
    assert merged["val"]["eval_config"]["n_tokens"] == 20 and "training" in merged


def test_bad_layer_and_missing_sae_are_clear_errors(d4, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt")
    rc = sae_train.main(["--checkpoint", str(MODEL_FILE), "--layers", "2,9", "--data", str(corpus),
                         "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "layer 9 is out of range" in err and "0..3" in err
    assert sae_eval.main(["--sae", str(tmp_path), "--quiet"]) == 2
    assert "neither an SAE folder" in capsys.readouterr().err


def test_short_runs_default_to_smaller_batches():
    from sae.train_run import MIN_STEPS, default_batch_size
    assert default_batch_size(50_000_000) == 4096  # long runs keep the recipe's batch
    assert default_batch_size(2_000_000) == 4096  # 488 steps: enough
    assert default_batch_size(1_000_000) == 2048
    assert default_batch_size(500_000) == 1024  # the CPU default: 488 steps instead of 122
    assert default_batch_size(6_000) == 1024  # never below 1024
    assert 500_000 // default_batch_size(500_000) >= MIN_STEPS
    assert default_batch_size(500_000, world=3) % 3 == 0  # global batches split evenly over ranks
