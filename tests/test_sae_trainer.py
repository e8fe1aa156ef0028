"""sae.trainer: exact resume, outputs, held-out phases, schedule and init helpers."""

import json

import pytest
import torch

from sae import SAEConfig, TrainConfig, ThresholdCalibrator, build_sae, geometric_median, load_sae, train_saes
from sae.models import LossContext
from sae.trainer import _resample_dead, new_run


@pytest.fixture(autouse=True)
def one_thread():
    """These SAEs are tiny: a second thread only adds barrier waits, which stall badly on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


D = 16
HOOK_A, HOOK_B = "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"


def make_batch(pos, batch=128):
    """Deterministic batch number `pos` for two hooks: sparse combinations of fixed directions."""
    dirs = torch.randn(40, D, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(pos)
    codes = (torch.rand(batch, 40, generator=g) < 0.08) * torch.rand(batch, 40, generator=g)
    a = codes @ dirs + 2.0
    return {HOOK_A: a, HOOK_B: torch.tanh(a) * 4 + 0.1 * torch.randn(batch, D, generator=g)}


class Stream:
    """A resumable activation stream; raises KeyboardInterrupt at batch `fail_at` (a crash)."""

    def __init__(self, fail_at=None, n_batches=None):
        self.pos, self.fail_at, self.n_batches = 0, fail_at, n_batches

    def __iter__(self):
        while self.n_batches is None or self.pos < self.n_batches:
            if self.pos == self.fail_at:
                raise KeyboardInterrupt("simulated crash")
            batch = make_batch(self.pos)
            self.pos += 1
            yield batch

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def plain_batches(fail_at=None):
    for pos in range(10_000):
        if pos == fail_at:
            raise KeyboardInterrupt("simulated crash")
        yield make_batch(pos)


def cfgs():
    return [
        SAEConfig(d_in=D, d_sae=64, architecture="topk", k=4, hook_name=HOOK_A),
        SAEConfig(d_in=D, d_sae=64, architecture="batchtopk", k=4, hook_name=HOOK_B),
        SAEConfig(d_in=D, d_sae=48, architecture="relu", hook_name=HOOK_A, name="relu_a"),
    ]


def train_cfg(**kw):
    base = dict(total_tokens=40 * 128, batch_size=128, init_tokens=512, calibration_tokens=1024, eval_tokens=1024,
                checkpoint_every=10, log_every=5, dead_tokens=512, resample_steps=(15,), quiet=True)
    return TrainConfig(**{**base, **kw})


def snapshot(out):
    """Everything a run leaves that must not depend on an interruption."""
    snap = {}
    for name in (HOOK_A, HOOK_B, "relu_a"):
        sae = load_sae(out / name)
        snap[name] = {k: v.clone() for k, v in sae.state_dict().items()}
        snap[name + "/eval"] = json.loads((out / name / "eval.json").read_text())["metrics"]
        state = torch.load(out / name / "training_state.pt", weights_only=False)
        snap[name + "/adam"] = state["optimizer"]["state"]
        snap[name + "/dead"] = state["tokens_since_fired"]
    return snap


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith("/eval"):
            assert a[key] == b[key], key
        elif key.endswith("/adam"):
            for i in a[key]:
                for field in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(a[key][i][field], b[key][i][field]), (key, i, field)
        elif key.endswith("/dead"):
            assert torch.equal(a[key], b[key]), key
        else:
            for name in a[key]:
                assert torch.equal(a[key][name], b[key][name]), (key, name)


def test_interrupted_then_resumed_run_matches_uninterrupted(tmp_path):
    train_saes(cfgs(), train_cfg(), Stream(), tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        train_saes(cfgs(), train_cfg(), Stream(fail_at=4 + 27), tmp_path / "cut")  # 4 init batches, crash at step 28
    assert not (tmp_path / "cut" / HOOK_A).exists()
    saes = train_saes(cfgs(), train_cfg(), Stream(), tmp_path / "cut", resume=True)
    assert_same(snapshot(tmp_path / "whole"), snapshot(tmp_path / "cut"))
    assert [s.cfg.architecture for s in saes] == ["topk", "jumprelu", "relu"]
    log = [json.loads(ln) for ln in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["sae"] == HOOK_A] == [5, 10, 15, 20, 25, 30, 35, 40]  # no duplicates


def test_resume_skips_consumed_batches_for_plain_iterables(tmp_path):
    train_saes(cfgs(), train_cfg(), plain_batches(), tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        train_saes(cfgs(), train_cfg(), plain_batches(fail_at=4 + 15), tmp_path / "cut")
    train_saes(cfgs(), train_cfg(), plain_batches(), tmp_path / "cut", resume=True)
    assert_same(snapshot(tmp_path / "whole"), snapshot(tmp_path / "cut"))


def test_outputs_and_eval_json(tmp_path):
    saes = train_saes(cfgs()[:2], train_cfg(export_sparsify=True), Stream(), tmp_path)
    for name in (HOOK_A, HOOK_B):
        folder = tmp_path / name
        assert {p.name for p in folder.iterdir()} == {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors",
                                                      "eval.json", "training_state.pt"}
        report = json.loads((folder / "eval.json").read_text())
        m = report["metrics"]
        assert m["n_tokens"] == 1024
        for key in ("fvu", "explained_variance_saelens", "mse", "l0", "dead_fraction", "dense_fraction_1pct",
                    "relative_reconstruction_bias"):
            assert key in m
        assert sum(report["log10_density_histogram"]["counts"]) == 64
        assert report["training"]["tokens"] == 40 * 128 and report["training"]["input_scale"] > 0
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["train_tokens"] == 40 * 128 and cfg["fvu"] == m["fvu"]
        assert load_sae(folder).cfg.train_tokens == 40 * 128
    # BatchTopK: the threshold was calibrated on held-out tokens to give mean L0 = k there
    bt = json.loads((tmp_path / HOOK_B / "eval.json").read_text())
    assert bt["exported_as"] == "jumprelu" and bt["training"]["calibration_tokens"] == 1024
    assert bt["metrics"]["l0"] == pytest.approx(4, rel=0.25)  # evaluated on other tokens
    assert (tmp_path / "sparsify" / HOOK_A / "sae.safetensors").exists()
    assert not (tmp_path / "sparsify" / HOOK_B).exists()  # sparsify has no JumpReLU
    assert saes[0].cfg.input_scale == 1.0
    x = make_batch(10_000)[HOOK_A]
    assert torch.equal(load_sae(tmp_path / HOOK_A).encode(x), saes[0].encode(x))


def test_refuses_to_clobber_and_checks_config_on_resume(tmp_path):
    short = train_cfg(total_tokens=8 * 128, eval_tokens=0, calibration_tokens=0)
    train_saes(cfgs()[:1], short, Stream(), tmp_path)
    with pytest.raises(FileExistsError, match="resume=True"):
        train_saes(cfgs()[:1], short, Stream(), tmp_path)
    with pytest.raises(ValueError, match="total_tokens"):
        train_saes(cfgs()[:1], train_cfg(total_tokens=9 * 128), Stream(), tmp_path, resume=True)
    other = [SAEConfig(d_in=D, d_sae=64, architecture="topk", k=8, hook_name=HOOK_A)]
    with pytest.raises(ValueError, match=r"\['k'\]"):
        train_saes(other, short, Stream(), tmp_path, resume=True)
    # a finished run resumes straight to export
    train_saes(cfgs()[:1], short, Stream(), tmp_path, resume=True)
    assert not (tmp_path / HOOK_A / "sparsity.safetensors").exists()  # eval_tokens=0: no density pass


def test_errors_name_the_hook_and_duplicates(tmp_path):
    bad = [SAEConfig(d_in=D, d_sae=32, architecture="topk", k=4, hook_name="blocks.9.hook_resid_post")]
    with pytest.raises(KeyError, match="blocks.9.hook_resid_post"):
        train_saes(bad, train_cfg(), Stream(), tmp_path / "a")
    dup = [cfgs()[0], cfgs()[0]]
    with pytest.raises(ValueError, match="unique"):
        train_saes(dup, train_cfg(), Stream(), tmp_path / "b")


def test_stream_ending_early_finishes_with_what_it_has(tmp_path):
    saes = train_saes(cfgs()[:1], train_cfg(checkpoint_every=0), Stream(n_batches=4 + 12), tmp_path)
    assert saes[0].cfg.train_tokens == 12 * 128
    assert "metrics" not in json.loads((tmp_path / HOOK_A / "eval.json").read_text())


def test_threshold_calibrator_hits_k():
    cfg = SAEConfig(d_in=D, d_sae=64, architecture="batchtopk", k=6)
    sae = build_sae(cfg, torch.Generator().manual_seed(0)).requires_grad_(False)
    sae.threshold.fill_(0.05)  # a poor EMA: calibration must not depend on it being close
    cal = ThresholdCalibrator(sae)
    xs = [make_batch(i)[HOOK_A] for i in range(8)]
    for x in xs:
        cal.update(x)
    theta = cal.threshold()
    acts = torch.relu(sae.pre_acts(torch.cat(xs)))
    assert float((acts > theta).sum(-1).double().mean()) == pytest.approx(6, rel=0.005)


def test_lr_schedule_warms_up_and_decays():
    tc = TrainConfig(total_tokens=100 * 10, batch_size=10, warmup_steps=10, decay_frac=0.2)
    assert tc.lr_factor(0) == pytest.approx(0.1)
    assert tc.lr_factor(90) == pytest.approx(1.0)
    assert tc.lr_factor(500) == pytest.approx(1.0)
    assert tc.lr_factor(900) == pytest.approx(0.5)
    assert tc.lr_factor(990) == pytest.approx(0.05)
    short = TrainConfig(total_tokens=40 * 10, batch_size=10)
    assert short.resolve_warmup_tokens() == 2 * 10  # 5% of a short run, not 1000 steps
    assert TrainConfig(batch_size=8192).resolve_lr(16384) == pytest.approx(2e-4)
    assert TrainConfig(batch_size=8192).resolve_lr(65536) == pytest.approx(1e-4)


def test_geometric_median_is_robust():
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [1000.0]])
    assert float(geometric_median(x)) == pytest.approx(2.0, abs=1e-3)  # 1-d: the median
    pts = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
    pts[:5] += 100.0  # outliers move the mean far more than the median
    gm = geometric_median(pts)
    assert gm.norm() < 0.5 < pts.mean(0).norm()
    cost = lambda y: float((pts - y).norm(dim=1).sum())  # noqa: E731
    for step in torch.eye(3).repeat(2, 1) * torch.tensor([[1e-2], [1e-2], [1e-2], [-1e-2], [-1e-2], [-1e-2]]):
        assert cost(gm) <= cost(gm + step)  # a minimiser of the summed distances


def test_resampling_reinitialises_dead_latents():
    cfg = SAEConfig(d_in=D, d_sae=32, architecture="topk", k=4)
    tc = TrainConfig(total_tokens=1024, batch_size=128)
    run = new_run(cfg, tc, "cpu", torch.Generator().manual_seed(0))
    x = make_batch(0)[HOOK_A]
    out = run.sae.training_loss(x, LossContext(None, 0.0, 0.0, True))
    out.loss.backward()
    run.optimizer.step()
    run.tokens_since_fired[:8] = 10_000  # latents 0-7 dead
    before = run.sae.W_dec.detach().clone()
    n = _resample_dead(run, x, dead_tokens=1000, gen=torch.Generator().manual_seed(1))
    assert n == 8
    assert not torch.allclose(run.sae.W_dec[:8], before[:8])
    assert torch.equal(run.sae.W_dec[8:], before[8:])
    assert torch.allclose(run.sae.W_dec[:8].norm(dim=1), torch.ones(8), atol=1e-5)
    assert bool((run.sae.b_enc[:8] == 0).all())
    state = run.optimizer.state[run.sae.W_dec]
    assert bool((state["exp_avg"][:8] == 0).all()) and bool((state["exp_avg"][8:] != 0).any())
    assert bool((run.optimizer.state[run.sae.W_enc]["exp_avg_sq"][:, :8] == 0).all())
    assert bool((run.tokens_since_fired[:8] == 0).all())
