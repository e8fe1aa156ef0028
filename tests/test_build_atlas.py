"""build_atlas end to end: the demo fallback builds model, SAEs, store, site and export; a rerun skips."""

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb

from atlas.neuronpedia_validate import validate
from scripts.build_atlas import main


def test_demo_atlas_end_to_end_and_rerun_skips(tmp_path, monkeypatch, capsys):
    # no nanochat on this "machine": the tiny demo preset is built and used
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "no_nanochat"))
    monkeypatch.setenv("NANOCHAT_ATLAS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NANOCHAT_ATLAS_DEMO", "tiny")
    out, work = tmp_path / "site", tmp_path / "work"
    argv = ["--layers", "1,2", "--out", str(out), "--work", str(work), "--expansion", "2",
            "--train_tokens", "6000", "--mine-tokens=3000", "--quiet"]
    assert main(argv) == 0

    con = duckdb.connect(str(work / "features.duckdb"), read_only=True)
    saes = con.execute("SELECT sae_id, layer, d_sae FROM saes ORDER BY layer").fetchall()
    assert [(s[0], s[1]) for s in saes] == [("blocks.1.hook_resid_post", 1), ("blocks.2.hook_resid_post", 2)]
    n_features = con.execute("SELECT count(*) FROM features").fetchone()[0]
    assert n_features == sum(s[2] for s in saes)
    con.close()
    for layer, _, d_sae in [(s[1], s[0], s[2]) for s in saes]:
        pages = list((out / "layers" / str(layer) / "features").glob("*.html"))
        assert len(pages) == d_sae
    assert (out / "index.html").exists() and (out / ".nojekyll").exists()
    assert [p for p in validate(work / "neuronpedia") if p.severity == "error"] == []

    stages = json.loads((work / "stages.json").read_text())
    assert set(stages) >= {"train", "render", "export"}
    before = (out / "index.html").stat().st_mtime_ns
    assert main(argv[:-1]) == 0  # not quiet: the summary says every stage is up to date
    printed = capsys.readouterr().out
    assert "train: up to date" in printed and "render: up to date" in printed
    assert (out / "index.html").stat().st_mtime_ns == before


def test_bad_layer_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "no_nanochat"))
    monkeypatch.setenv("NANOCHAT_ATLAS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NANOCHAT_ATLAS_DEMO", "tiny")
    assert main(["--layers", "99", "--out", str(tmp_path / "s"), "--quiet"]) == 2
    assert "layer 99" in capsys.readouterr().err


def test_build_atlas_under_torchrun(tmp_path):
    """2 gloo ranks: both train and mine, rank 0 alone renders, exports and prints; a rerun skips."""
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(repo), NANOCHAT_ATLAS_DEMO="tiny",
               NANOCHAT_BASE_DIR=str(tmp_path / "no_nanochat"), NANOCHAT_ATLAS_CACHE=str(tmp_path / "cache"))
    out, work = tmp_path / "site", tmp_path / "work"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "scripts.build_atlas", "--layers", "1,2", "--out", str(out), "--work", str(work),
           "--expansion", "2", "--train-tokens", "6000", "--mine-tokens", "3000", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, _failure(proc)
    assert proc.stdout.count("atlas built in") == 1  # rank 0 alone prints the summary
    assert "(2 ranks)" in proc.stdout
    con = duckdb.connect(str(work / "features.duckdb"), read_only=True)
    d_sae = dict(con.execute("SELECT layer, d_sae FROM saes").fetchall())
    build = json.loads(con.execute("SELECT value FROM meta WHERE key = 'build'").fetchone()[0])
    con.close()
    assert sorted(d_sae) == [1, 2] and build["ranks"] == 2
    for layer, n in d_sae.items():
        assert len(list((out / "layers" / str(layer) / "features").glob("*.html"))) == n
    assert [p for p in validate(work / "neuronpedia") if p.severity == "error"] == []

    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, _failure(proc)
    assert proc.stdout.count("train: up to date") == 1 and "render: up to date" in proc.stdout


def _failure(proc) -> str:
    """What a failed launch said: its errors from every rank, then the ends of both streams."""
    keys = ("error", "Error", "terminate", "what()", "Traceback", "Abort", "Signal")
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if any(k in ln for k in keys)]
    return "\n".join(lines[:60]) + "\n--- stdout ---\n" + proc.stdout[-2000:] + "\n--- stderr ---\n" + proc.stderr[-4000:]
