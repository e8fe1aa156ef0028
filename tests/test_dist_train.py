"""SAE training under torch.distributed (gloo, 2 CPU processes): data- and layer-parallel runs equal
a single process on the same global batches, resume, failures, and the torchrun CLI end to end."""

import json
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.distributed import DistContext, RankFailure
from sae import SAEConfig, TrainConfig, load_sae, train_saes
from sae.distributed import LayerExchange

REPO = Path(__file__).resolve().parents[1]
D = 16
HOOKS = ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post", "blocks.3.hook_resid_post")
BATCH = 128  # global tokens per step


def make_batch(pos):
    """Global batch number `pos`: sparse combinations of fixed directions, one tensor per hook."""
    dirs = torch.randn(40, D, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(pos)
    codes = (torch.rand(BATCH, 40, generator=g) < 0.08) * torch.rand(BATCH, 40, generator=g)
    a = codes @ dirs + 2.0
    return {HOOKS[0]: a, HOOKS[1]: torch.tanh(a) * 4 + 0.1 * torch.randn(BATCH, D, generator=g),
            HOOKS[2]: a.flip(-1) * 0.5}


class Stream:
    """A resumable stream of rank `rank`'s rows [rank·b, (rank+1)·b) of every global batch;
    raises KeyboardInterrupt (a crash) at batch `fail_at`."""

    def __init__(self, rank=0, world=1, fail_at=None):
        self.rank, self.world, self.fail_at, self.pos = rank, world, fail_at, 0

    def __iter__(self):
        b = BATCH // self.world
        while True:
            if self.pos == self.fail_at:
                raise KeyboardInterrupt("simulated crash")
            batch = make_batch(self.pos)
            self.pos += 1
            yield {h: x[self.rank * b:(self.rank + 1) * b] for h, x in batch.items()}

    def __next__(self):  # LayerExchange pulls with next()
        if not hasattr(self, "_it"):
            self._it = iter(self)
        return next(self._it)

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def cfgs():
    return [
        SAEConfig(d_in=D, d_sae=64, architecture="topk", k=4, hook_name=HOOKS[0]),
        SAEConfig(d_in=D, d_sae=64, architecture="batchtopk", k=4, hook_name=HOOKS[1]),
        SAEConfig(d_in=D, d_sae=48, architecture="relu", hook_name=HOOKS[2], name="relu_c"),
    ]


NAMES = [c.folder_name for c in cfgs()]


def train_cfg(**kw):
    base = dict(total_tokens=24 * BATCH, batch_size=BATCH, init_tokens=320, calibration_tokens=512,
                eval_tokens=512, checkpoint_every=8, log_every=4, dead_tokens=256, resample_steps=(12,),
                quiet=True)
    return TrainConfig(**{**base, **kw})


def _worker(rank, world, port, root):
    """Every distributed scenario in one process group (process start-up dominates the cost)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ctx = DistContext(rank, world)
    root = Path(root)
    try:
        train_saes(cfgs(), train_cfg(), Stream(rank, world), root / "dp", ctx=ctx)
        try:  # every rank crashes at the same batch (3 init batches, then step 19)
            train_saes(cfgs(), train_cfg(), Stream(rank, world, fail_at=3 + 18), root / "cut", ctx=ctx)
        except KeyboardInterrupt:
            pass
        train_saes(cfgs(), train_cfg(), Stream(rank, world), root / "cut", resume=True, ctx=ctx)

        hooks = [c.hook_name for c in cfgs()]
        saes = train_saes(cfgs(), train_cfg(), LayerExchange(Stream(rank, world), hooks, ctx), root / "lp",
                          ctx=ctx, layer_parallel=True)
        if rank == 0:
            torch.save([s.state_dict() for s in saes], root / "lp_returned.pt")

        # rank 1 alone cannot export (its folder's parent is a file); every rank must hear of it
        named = cfgs()[:2] + [SAEConfig(d_in=D, d_sae=48, architecture="relu", hook_name=HOOKS[2], name="sub/relu_c")]
        (root / "lpfail").mkdir(exist_ok=True)
        (root / "lpfail" / "sub").write_text("in the way")
        try:
            train_saes(named, train_cfg(), LayerExchange(Stream(rank, world), hooks, ctx), root / "lpfail",
                       ctx=ctx, layer_parallel=True)
            outcome = "no error"
        except RankFailure as e:
            outcome = f"RankFailure: {e}"
        (root / f"lpfail_rank{rank}.txt").write_text(outcome)
    except BaseException:
        (root / f"crash_rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_saes(cfgs(), train_cfg(), Stream(), root / "single")
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        mp.spawn(_worker, args=(2, _free_port(), str(root)), nprocs=2)
    finally:
        torch.set_num_threads(threads)
    return root


def weights(folder):
    return load_sae(folder).state_dict()


def test_data_parallel_matches_single_process(runs):
    for name in NAMES:
        single, dp = weights(runs / "single" / name), weights(runs / "dp" / name)
        for key in single:
            assert torch.allclose(single[key], dp[key], rtol=1e-4, atol=1e-5), (name, key)
        a = json.loads((runs / "single" / name / "eval.json").read_text())
        b = json.loads((runs / "dp" / name / "eval.json").read_text())
        assert b["metrics"]["n_tokens"] == a["metrics"]["n_tokens"] == 512
        assert b["metrics"]["fvu"] == pytest.approx(a["metrics"]["fvu"], rel=1e-3)
        assert b["training"]["tokens"] == a["training"]["tokens"] == 24 * BATCH
        assert b["training"]["input_scale"] == pytest.approx(a["training"]["input_scale"], rel=1e-6)
        for key in ("threshold_calibrated", "threshold_ema"):
            if key in a["training"]:
                assert b["training"][key] == pytest.approx(a["training"][key], rel=1e-4)
        sd = torch.load(runs / "single" / name / "training_state.pt", weights_only=False)
        dd = torch.load(runs / "dp" / name / "training_state.pt", weights_only=False)
        assert torch.equal(sd["tokens_since_fired"], dd["tokens_since_fired"])  # dead counters agree
        # something was dead at some point, so AuxK's global variance and resampling were exercised
    log = [json.loads(ln) for ln in (runs / "dp" / "train_log.jsonl").read_text().splitlines()]
    ref = [json.loads(ln) for ln in (runs / "single" / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["sae"]) for r in log] == [(r["step"], r["sae"]) for r in ref]
    for r, s in zip(log, ref):
        assert r["fvu"] == pytest.approx(s["fvu"], rel=1e-3) and r["l0"] == pytest.approx(s["l0"], rel=1e-3)
    assert any(r["auxk"] > 0 for r in ref if "auxk" in r)


def test_data_parallel_checkpoint_holds_every_rank_and_resumes_exactly(runs):
    ckpt = torch.load(runs / "dp" / "checkpoint.pt", weights_only=False)
    assert ckpt["world"] == 2 and not ckpt["layer_parallel"]
    assert ckpt["data_state"] == [{"pos": 3 + 24}, {"pos": 3 + 24}]  # each rank's own position
    for name in NAMES:
        whole, cut = weights(runs / "dp" / name), weights(runs / "cut" / name)
        for key in whole:
            assert torch.equal(whole[key], cut[key]), (name, key)
    # a different world size is refused, naming the layout
    with pytest.raises(ValueError, match="2 ranks, data-parallel.*same number of ranks"):
        train_saes(cfgs(), train_cfg(), Stream(), runs / "cut", resume=True)


def test_layer_parallel_equals_single_process(runs):
    returned = torch.load(runs / "lp_returned.pt")
    assert len(returned) == 3  # rank 0 gets every SAE, in config order
    for name, state in zip(NAMES, returned):
        single, lp = weights(runs / "single" / name), weights(runs / "lp" / name)
        for key in single:
            assert torch.equal(single[key], lp[key]), (name, key)  # the same math on the same batches
            assert torch.equal(state[key], lp[key])
    ckpt = torch.load(runs / "lp" / "checkpoint.pt", weights_only=False)
    assert ckpt["layer_parallel"] and [SAEConfig.from_dict(e["cfg"]).folder_name for e in ckpt["saes"]] == NAMES


def test_a_failing_export_on_one_rank_fails_every_rank(runs):
    for rank in (0, 1):
        msg = (runs / f"lpfail_rank{rank}.txt").read_text()
        assert msg.startswith("RankFailure: 1 of 2 rank(s) failed") and "rank 1:" in msg, msg
    folder = runs / "lpfail"
    # rank 0's SAEs are complete folders; rank 1's was never started; no temp dirs left behind
    assert {p.name for p in folder.iterdir()} == {"sub", "checkpoint.pt", "train_log.jsonl", *NAMES[:2]}
    for name in NAMES[:2]:
        load_sae(folder / name)
    assert (folder / "sub").read_text() == "in the way"


# ---- the CLI under a launcher ----

def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


TRAIN_ARGS = ["--layers", "1,2", "--tokens", "4096", "--batch-size", "256", "--eval-tokens", "1024",
              "--device", "cpu"]


def test_torchrun_end_to_end_writes_loadable_saes(tmp_path):
    out = tmp_path / "saes"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "scripts.sae_train", *TRAIN_ARGS, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("ranks:   2, data-parallel") == 1  # only rank 0 speaks
    for layer in (1, 2):
        folder = out / f"blocks.{layer}.hook_resid_post"
        sae = load_sae(folder)
        assert sae.cfg.architecture == "jumprelu" and sae.cfg.d_in == 32
        assert sae.cfg.train_tokens == 4096
        codes = sae.encode(torch.randn(5, 32))
        assert codes.shape == (5, sae.cfg.d_sae)
        report = json.loads((folder / "eval.json").read_text())
        assert report["metrics"]["n_tokens"] > 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["world"] == 2 and len(ckpt["data_state"]) == 2
    assert ckpt["data_state"][0]["identity"]["source"]["rank"] == 0
    # the same output resumed by a single process is refused with a clear message
    proc = subprocess.run([sys.executable, "-m", "scripts.sae_train", *TRAIN_ARGS, "--out", str(out), "--resume"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "same number of ranks" in proc.stderr, proc.stderr[-3000:]


def test_a_rank_without_data_fails_every_rank(tmp_path):
    """A corpus whose train split is one document gives rank 1 nothing: rank 1 fails with the reason,
    rank 0 (waiting in a collective) with a RankFailure; both exit non-zero and nothing is written."""
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("def f():\n    return 1\n\nclass A:\n    pass\n")
    out = tmp_path / "saes"
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = dict(_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "scripts.sae_train", *TRAIN_ARGS, "--out", str(out),
                                       "--data", str(corpus)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert codes[0] != 0 and codes[1] != 0, results
    assert "rank 1: error:" in results[1][1] and "share of rank 1 of 2" in results[1][1], results[1][1][-2000:]
    assert "rank 0: error: rank 0 of 2: a peer rank failed" in results[0][1], results[0][1][-2000:]
    assert not out.exists() or not any(out.iterdir())
