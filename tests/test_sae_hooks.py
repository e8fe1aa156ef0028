"""Named hook points on the nanochat d4 fixture: each captures the tensor its name promises."""

from pathlib import Path

import pytest
import torch

from nanochat.checkpoint_manager import load_model_from_dir
from sae.activations import hook_dims
from sae.hooks import HOOK_KINDS, capture, edit, hook_name, parse_hook_name, run_with_capture

D4 = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "nanochat_d4"


@pytest.fixture(scope="module")
def d4():
    if not D4.exists():
        pytest.skip(f"nanochat fixtures not found at {D4} (they sit beside the checkout as ../shared/fixtures)")
    model, _, _ = load_model_from_dir(D4 / "base_checkpoints" / "d4", "cpu")
    return model, torch.load(D4 / "reference.pt")


def test_resid_post_equals_the_fixture_block_outputs(d4):
    model, ref = d4
    names = [hook_name(i, "resid_post") for i in range(4)]
    acts = run_with_capture(model, ref["input_ids"], names)
    for i, name in enumerate(names):
        assert acts[name].shape == ref["resid_post"][i].shape
        assert (acts[name] - ref["resid_post"][i]).abs().max().item() <= 1e-4, name


def test_resid_pre_of_next_block_is_resid_post(d4):
    model, ref = d4
    names = [hook_name(i, "resid_post") for i in range(3)] + [hook_name(i + 1, "resid_pre") for i in range(3)]
    acts = run_with_capture(model, ref["input_ids"], names)
    for i in range(3):
        assert torch.equal(acts[f"blocks.{i + 1}.hook_resid_pre"], acts[f"blocks.{i}.hook_resid_post"])


def test_block_decomposition_adds_up(d4):
    model, ref = d4
    kinds = ["resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"]
    acts = run_with_capture(model, ref["input_ids"], [hook_name(2, k) for k in kinds])
    a = {k: acts[hook_name(2, k)] for k in kinds}
    assert torch.allclose(a["resid_mid"], a["resid_pre"] + a["attn_out"])
    assert torch.allclose(a["resid_post"], a["resid_mid"] + a["mlp_out"], atol=1e-5)


def test_mlp_post_is_four_times_wider(d4):
    model, ref = d4
    d = model.config.n_embd
    acts = run_with_capture(model, ref["input_ids"], ["blocks.1.hook_mlp_post", "blocks.1.hook_resid_post"])
    assert acts["blocks.1.hook_mlp_post"].shape == (1, 128, 4 * d)
    assert (acts["blocks.1.hook_mlp_post"] >= 0).all()  # relu² output
    assert hook_dims(model, ["blocks.1.hook_mlp_post", "blocks.3.hook_resid_post"]) == {
        "blocks.1.hook_mlp_post": 4 * d, "blocks.3.hook_resid_post": d}


def test_unknown_hook_and_out_of_range_layer_list_the_valid_ones(d4):
    model, ref = d4
    with pytest.raises(ValueError, match=r"layer 7 is out of range.*layers 0\.\.3"):
        run_with_capture(model, ref["input_ids"], ["blocks.7.hook_resid_post"])
    with pytest.raises(ValueError) as e:
        parse_hook_name("blocks.1.hook_resid_sideways", 4)
    for kind in HOOK_KINDS:
        assert kind in str(e.value)
    assert "0..3" in str(e.value)
    with pytest.raises(ValueError, match="out of range"):
        hook_dims(model, ["blocks.4.hook_mlp_post"])


def test_capture_stops_after_the_deepest_block(d4):
    model, ref = d4
    calls = []
    handles = [model.transformer.h[i].register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i in range(4)]
    handles.append(model.lm_head.register_forward_hook(lambda m, a, o: calls.append("lm_head")))
    try:
        run_with_capture(model, ref["input_ids"], ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"])
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1]


def test_edit_replaces_the_tensor_downstream(d4):
    model, ref = d4
    idx = ref["input_ids"]
    with torch.no_grad():
        clean = model(idx)
        with edit(model, "blocks.1.hook_resid_post", lambda t: t):
            same = model(idx)
        with capture(model, ["blocks.2.hook_resid_pre"]) as acts, \
                edit(model, "blocks.1.hook_resid_post", lambda t: t * 0.5):
            edited = model(idx)
            seen = acts["blocks.2.hook_resid_pre"].clone()
        after = model(idx)
    assert torch.equal(same, clean)
    assert (seen - ref["resid_post"][1] * 0.5).abs().max().item() <= 1e-4
    assert (edited - clean).abs().max().item() > 1e-2
    assert torch.equal(after, clean)  # the hooks are gone
