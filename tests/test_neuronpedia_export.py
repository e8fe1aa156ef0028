"""The Neuronpedia exporter: layout, rows against the store, hostile strings, determinism."""

import gzip
import json

import duckdb
import numpy as np
import pytest

from atlas import saedashboard
from atlas.neuronpedia import (
    ACTIVATION_KEYS, API_DIR, EXPLANATION_KEYS, FEATURE_KEYS, MODEL_KEYS, RELEASE_KEYS,
    SAEDASHBOARD_DIR, SOURCE_KEYS, SOURCESET_KEYS, ExportConfig, ExportError, activation_id,
    export_neuronpedia, model_id_from_checkpoint,
)
from atlas.neuronpedia_validate import validate
from scripts import neuronpedia_export
from tests.np_fixtures import BOS, HOSTILE, HOSTILE_LABEL, build_store, read_jsonl

SOURCES = ("4-atlas-res-40", "10-atlas-res-40")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("np") / "features.duckdb")


@pytest.fixture(scope="module")
def export(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("np_out") / "export"
    summary = export_neuronpedia(store, out, quiet=True)
    return out, summary


def source_dir(export, source="4-atlas-res-40"):
    return export[0] / "nanochat-d20" / source


def rows(export, kind, source="4-atlas-res-40"):
    folder = source_dir(export, source) / kind
    files = sorted(folder.glob("batch-*.jsonl.gz"), key=lambda p: int(p.name[6:-9]))
    return [r for f in files for r in read_jsonl(f)]


def query(store, sql, *params):
    con = duckdb.connect(str(store), read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


def test_layout_one_directory_per_sae(export):
    out, summary = export
    assert sorted(p.name for p in (out / "nanochat-d20").iterdir()) == sorted(SOURCES)
    for source in SOURCES:
        d = out / "nanochat-d20" / source
        for name in ("release.jsonl", "model.jsonl", "sourceset.jsonl", "source.jsonl",
                     "features/batch-0.jsonl.gz", "activations/batch-0.jsonl.gz",
                     "explanations/batch-0.jsonl.gz"):
            assert (d / name).is_file(), name
    assert (out / "README.txt").is_file() and (out / API_DIR / "plan.json").is_file()
    by_source = {s["sourceId"]: s for s in summary["sources"]}
    # 39 live features × (20 top + 5 bins × 5 intervals), one dead feature
    assert by_source["4-atlas-res-40"]["features"] == 40
    assert by_source["4-atlas-res-40"]["activations"] == 39 * 45
    assert by_source["4-atlas-res-40"]["explanations"] == 37  # no label: 2, 3 and dead 39
    assert validate(out) == []


def test_metadata_rows_have_exactly_the_schema_keys(export):
    d = source_dir(export)
    for name, keys in (("release", RELEASE_KEYS), ("model", MODEL_KEYS),
                       ("sourceset", SOURCESET_KEYS), ("source", SOURCE_KEYS)):
        lines = (d / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == 1
        assert tuple(json.loads(lines[0])) == keys
    model = read_jsonl(d / "model.jsonl")[0]
    assert (model["id"], model["layers"], model["dimension"], model["instruct"],
            model["inferenceEnabled"]) == ("nanochat-d20", 20, 64, False, False)
    source = read_jsonl(d / "source.jsonl")[0]
    assert source["setName"] == "atlas-res-40"
    assert source["saelensConfig"]["hook_name"] == "blocks.4.hook_resid_post"
    assert source["dataset"] == "fineweb-edu <sample>" and source["num_prompts"] == 1200
    assert "gain" in source["notes"]
    other = read_jsonl(source_dir(export, "10-atlas-res-40") / "source.jsonl")[0]
    assert "raw W_dec" in other["notes"]
    assert source["createdAt"] == "2026-01-02T03:04:05"


def test_feature_rows_match_the_store(export, store):
    feats = rows(export, "features")
    assert [f["index"] for f in feats] == [str(i) for i in range(40)]
    assert all(tuple(f) == FEATURE_KEYS for f in feats)
    density = dict(query(store, "SELECT feature, density FROM features WHERE sae_id = ?",
                         "blocks.4.hook_resid_post"))
    for f in feats:
        i = int(f["index"])
        assert f["frac_nonzero"] == density[i]
        assert f["layer"] == "4-atlas-res-40" and f["sourceSetName"] == "atlas-res-40"
        assert len(f["pos_str"]) == len(f["pos_values"]) == 10
        assert f["pos_values"] == sorted(f["pos_values"], reverse=True)
        assert str(i) not in map(str, f["topkCosSimIndices"])
    # logit tables: the gain-corrected values of the first SAE (0.5 × raw in the fixture)
    raw = query(store, "SELECT value FROM logit_effects WHERE sae_id = ? AND feature = 5 AND "
                       "kind = 'raw' AND rank = 1", "blocks.4.hook_resid_post")
    assert feats[5]["pos_values"][0] == pytest.approx(0.5 * raw[0][0], abs=1e-4)
    # histograms: 50 bins; the 100-bin logit histogram is merged pairwise, counts kept
    edges, counts = query(store, "SELECT edges, counts FROM histograms WHERE sae_id = ? AND "
                                 "feature = 5 AND kind = 'logit'", "blocks.4.hook_resid_post")[0]
    merged = np.add.reduceat(counts, range(0, 100, 2))
    assert feats[5]["logits_hist_data_bar_heights"] == merged.tolist()
    assert feats[5]["logits_hist_data_bar_values"][0] == pytest.approx((edges[0] + edges[2]) / 2,
                                                                       abs=1e-4)
    act_counts = query(store, "SELECT counts FROM histograms WHERE sae_id = ? AND feature = 5 "
                              "AND kind = 'activation'", "blocks.4.hook_resid_post")[0][0]
    assert feats[5]["freq_hist_data_bar_heights"] == act_counts
    # correlated features: co-activation values, with the decoder cosine where the store has it
    f5 = feats[5]
    assert f5["correlated_features_pearson"] == [0.8, 0.5, 0.3]
    assert f5["correlated_features_l1"][:2] == f5["topkCosSimValues"][:2]
    assert f5["correlated_features_l1"][2] is None
    dead = feats[39]
    assert dead["maxActApprox"] == 0 and dead["freq_hist_data_bar_values"] == []


def test_activation_rows_top_then_intervals(export, store):
    acts = rows(export, "activations")
    feats = {f["index"]: f for f in rows(export, "features")}
    by_feature = {}
    for a in acts:
        by_feature.setdefault(a["index"], []).append(a)
    assert "39" not in by_feature  # the dead feature has no examples
    bins = {(f, b): (lo, hi, frac) for f, b, lo, hi, frac in query(
        store, "SELECT feature, bin, lo, hi, frac FROM interval_bins WHERE sae_id = ?",
        "blocks.4.hook_resid_post")}
    for index, group in by_feature.items():
        top, intervals = group[:20], group[20:]
        assert all(a["binMin"] == -1 and a["binContains"] == -1 for a in top)
        assert all(a["binMax"] == feats[index]["maxActApprox"] for a in top)
        assert feats[index]["maxActApprox"] == max(a["maxValue"] for a in group)
        assert len(intervals) == 25 and all(a["binContains"] != -1 for a in intervals)
        for a in intervals:
            b = next(b for b in range(5)
                     if round(float(bins[(int(index), b)][1]), 4) == a["binMax"])
            assert a["binContains"] == round(bins[(int(index), b)][2], 4)
        # the interval example that repeats a top example is dropped
        assert not {a["dataIndex"] for a in top} & {a["dataIndex"] for a in intervals}
        for k, a in enumerate(group):
            assert tuple(a) == ACTIVATION_KEYS
            assert a["id"] == activation_id("c", "nanochat-d20", "4-atlas-res-40", int(index), k)
            assert len(a["tokens"]) == len(a["values"]) <= 32
            assert a["maxValue"] == max(a["values"]) == a["values"][a["maxValueTokenIndex"]]
    assert len({a["id"] for a in acts}) == len(acts)


def test_windows_keep_one_document_without_bos(export, store):
    """A window that reaches back over BOS starts right after it; BOS itself is never shown."""
    # (the top example wins over the interval example that repeats it and was dropped)
    stored = {(str(f), f"{d}:{p}"): c for f, d, p, c in query(
        store, "SELECT feature, doc_id, token_pos, center FROM examples WHERE sae_id = ? "
               "ORDER BY kind = 'top'", "blocks.4.hook_resid_post")}
    crossed = 0
    for a in rows(export, "activations"):
        assert BOS.decode() not in a["tokens"]
        pos = int(a["dataIndex"].split(":")[1])
        center = stored[(a["index"], a["dataIndex"])]
        if pos <= center:  # the document's BOS is inside the stored window
            crossed += 1
            assert a["qualifyingTokenIndex"] == pos - 1
        else:
            assert a["qualifyingTokenIndex"] == center
    assert crossed > 0


def test_hostile_strings_survive_and_never_carry_nul(export):
    feats = rows(export, "features")
    decoded = [t.decode("utf-8", "replace").replace("\x00", "\ufffd") for t in HOSTILE]
    assert feats[0]["pos_str"][:len(HOSTILE)] == decoded
    assert "<script>alert('x')</script>" in feats[0]["pos_str"]   # verbatim: the UI escapes
    assert "\\u0000" in feats[0]["pos_str"]                      # the literal text survives
    assert feats[0]["pos_str"][3] == "\ufffd"                     # half a UTF-8 character
    top_tokens = [a["tokens"][a["qualifyingTokenIndex"]] for a in rows(export, "activations")[:7]]
    assert top_tokens == decoded
    expl = {e["index"]: e for e in rows(export, "explanations")}
    assert expl["0"]["description"] == HOSTILE_LABEL.replace("\x00", "\ufffd")
    # what the importer reads (and the API bodies) never holds the text it would rewrite
    imported = [p for p in export[0].rglob("*") if p.is_file() and SAEDASHBOARD_DIR not in p.parts]
    for path in imported:
        data = path.read_bytes()
        text = (gzip.decompress(data) if path.name.endswith(".gz") else data).decode("utf-8")
        clean = "\x00" not in text and "\\u0000" not in text
        assert clean, path


def test_explanations_follow_labels(export):
    expl = {e["index"]: e for e in rows(export, "explanations")}
    assert all(tuple(e) == EXPLANATION_KEYS for e in expl.values())
    assert "2" not in expl and "3" not in expl and "39" not in expl  # none, blank, dead
    assert len(expl["1"]["description"]) == 512
    assert expl["1"]["notes"] == "rule=max-token; F1=0.51"
    assert expl["7"]["notes"] == "rule=max-token"  # label_f1 is NULL for multiples of 7
    assert expl["4"]["id"] == activation_id("e", "nanochat-d20", "4-atlas-res-40", 4, 0)


def test_export_is_deterministic(store, export, tmp_path):
    again = tmp_path / "again"
    export_neuronpedia(store, again, quiet=True)
    first = sorted(p.relative_to(export[0]) for p in export[0].rglob("*") if p.is_file())
    second = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert first == second
    for rel in first:
        assert (export[0] / rel).read_bytes() == (again / rel).read_bytes(), rel
    gz = (again / "nanochat-d20" / "4-atlas-res-40" / "features" / "batch-0.jsonl.gz").read_bytes()
    assert gz[4:8] == b"\x00\x00\x00\x00"  # gzip mtime 0


def test_manifest_lists_every_file_with_counts(export):
    manifest = json.loads((export[0] / "manifest.json").read_text())
    files = {f["path"]: f for f in manifest["files"]}
    on_disk = {p.relative_to(export[0]).as_posix() for p in export[0].rglob("*") if p.is_file()}
    assert set(files) == on_disk - {"manifest.json"}
    assert files["nanochat-d20/4-atlas-res-40/activations/batch-0.jsonl.gz"]["lines"] == 39 * 45
    assert {s["sourceId"] for s in manifest["sources"]} == set(SOURCES)


def test_api_payloads_batch_at_most_128_features(tmp_path):
    store = build_store(tmp_path / "big.duckdb", saes=(("blocks.6.hook_resid_post", 6),),
                        n_features=300, n_top=4, per_bin=1, seed=1)
    out = tmp_path / "out"
    export_neuronpedia(store, out, quiet=True)
    api = out / API_DIR
    plan = json.loads((api / "plan.json").read_text())
    assert [r["endpoint"] for r in plan["requests"]] == [
        "model/new", "source-set/new"] + ["feature/upload-batch"] * 3
    assert json.loads((api / plan["requests"][0]["file"]).read_text()) == {
        "id": "nanochat-d20", "layers": 20, "displayName": "nanochat d20"}
    batches = [json.loads((api / r["file"]).read_text()) for r in plan["requests"][2:]]
    assert [len(b["features"]) for b in batches] == [128, 128, 43]  # feature 299 is dead
    assert plan["skipped"][0]["reason"].startswith("1 features without activations")
    f = batches[0]["features"][0]
    assert set(f) == {"index", "density", "topLogits", "bottomLogits", "explanations",
                      "activations"}
    assert isinstance(f["index"], int) and len(f["topLogits"]) == 10
    tops = [a for a in f["activations"] if a["quantileFraction"] is None]
    assert len(tops) == 4 and len(f["activations"]) == 4 + 4  # bin 4's example repeats a top one
    assert {a["quantileMin"] for a in tops} == {min(max(a["values"]) for a in tops)}
    assert {a["quantileMax"] for a in tops} == {max(max(a["values"]) for a in tops)}
    assert all(0 <= a["quantileFraction"] <= 1 for a in f["activations"][4:])
    # SAEDashboard files: 128 features each, every key the upstream converters read
    dash = out / SAEDASHBOARD_DIR / "nanochat-d20_atlas-res-300_blocks.6.hook_resid_post_300"
    files = sorted(dash.glob("batch-*.json"))
    assert [len(json.loads(p.read_text())["features"]) for p in files] == [128, 128, 44]
    assert validate(out) == []


def test_saedashboard_batches_reconvert_to_the_bulk_rows(export):
    """Map batch-N.json back the way upstream converters do; it must give our bulk rows."""
    dash = export[0] / SAEDASHBOARD_DIR / "nanochat-d20_atlas-res-40_blocks.4.hook_resid_post_40"
    batch = json.loads((dash / "batch-0.json").read_text())
    assert (batch["model_id"], batch["layer"], batch["sae_set"], batch["sae_id_suffix"]) == (
        "nanochat-d20", 4, "atlas-res-40", None)
    assert json.loads((dash / "skipped_indexes.json").read_text())["skipped_indexes"] == []
    feats = rows(export, "features")
    acts = rows(export, "activations")
    k = 0
    for dfeat, neuron in zip(batch["features"], feats, strict=True):
        assert tuple(dfeat) == saedashboard.FEATURE_KEYS
        assert str(dfeat["feature_index"]) == neuron["index"]
        for key in saedashboard.SHARED_KEYS:
            assert dfeat[key] == neuron[key], key
        for da in dfeat["activations"]:
            a = acts[k]
            assert a["index"] == neuron["index"]
            assert (da["tokens"], da["values"], da["bin_min"], da["bin_max"], da["bin_contains"],
                    da["qualifying_token_index"]) == (a["tokens"], a["values"], a["binMin"],
                                                      a["binMax"], a["binContains"],
                                                      a["qualifyingTokenIndex"])
            k += 1
    assert k == len(acts)


def test_cli_overrides_ids(tmp_path, capsys):
    store = build_store(tmp_path / "s.duckdb", n_features=8, n_top=3, per_bin=1)
    out = tmp_path / "cli"
    rc = neuronpedia_export.main(["--store", str(store), "--out", str(out), "--model_id",
                                  "nanochat-d20-sft", "--source-set", "me-res-8",
                                  "--created-at", "2026-03-01T12:00:00+01:00", "--no-saedashboard"])
    assert rc == 0
    d = out / "nanochat-d20-sft" / "10-me-res-8"
    assert read_jsonl(d / "source.jsonl")[0]["setName"] == "me-res-8"
    assert read_jsonl(d / "features" / "batch-0.jsonl.gz")[0]["createdAt"] == "2026-03-01T11:00:00"
    assert not (out / SAEDASHBOARD_DIR).exists()
    assert "nanochat-d20-sft/10-me-res-8: 8 features" in capsys.readouterr().out
    assert validate(out) == []


def test_ids_derive_from_the_checkpoint(tmp_path):
    assert model_id_from_checkpoint("/x/base_checkpoints/d20/model_021400.pt") == "nanochat-d20"
    assert model_id_from_checkpoint("chatsft_checkpoints/d12/model_000650.pt") == "nanochat-d12-sft"
    assert model_id_from_checkpoint("demo") is None
    store = build_store(tmp_path / "s.duckdb", saes=(("blocks.2.hook_resid_post", 2),),
                        n_features=8)
    con = duckdb.connect(str(store))
    con.execute("UPDATE saes SET model_id = NULL, "
                "checkpoint = 'runs/chatsft_checkpoints/d12/model_000650.pt'")
    con.close()
    out = tmp_path / "out"
    export_neuronpedia(store, out, quiet=True)
    model = read_jsonl(out / "nanochat-d12-sft" / "2-atlas-res-8" / "model.jsonl")[0]
    assert model["id"] == "nanochat-d12-sft" and model["instruct"] is True


def test_two_hooks_on_one_layer_get_suffixes(tmp_path):
    store = build_store(tmp_path / "s.duckdb", n_features=8, saes=(
        ("blocks.4.hook_resid_pre", 4), ("blocks.4.hook_resid_post", 4)))
    out = tmp_path / "out"
    export_neuronpedia(store, out, source_set="mine", quiet=True)
    assert sorted(p.name for p in (out / "nanochat-d20").iterdir()) == [
        "4-mine__resid-post", "4-mine__resid-pre"]
    plan = json.loads((out / API_DIR / "plan.json").read_text())
    assert all(r["endpoint"] != "feature/upload-batch" for r in plan["requests"])
    assert {s["reason"] for s in plan["skipped"]} == {
        "suffixed sources cannot be created through the API"}
    assert [p for p in validate(out) if p.severity == "error"] == []


def test_replaces_a_previous_export_but_not_other_directories(tmp_path):
    store = build_store(tmp_path / "s.duckdb", n_features=8, n_top=3, per_bin=1)
    out = tmp_path / "out"
    export_neuronpedia(store, out, quiet=True)
    (out / "stale.txt").write_text("left over")
    export_neuronpedia(store, out, quiet=True)
    assert not (out / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a previous Neuronpedia export"):
        export_neuronpedia(store, other, quiet=True)
    assert (other / "notes.txt").read_text() == "keep me"


def test_bad_input_errors_name_the_culprit(store, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.duckdb"):
        export_neuronpedia(tmp_path / "missing.duckdb", tmp_path / "o1", quiet=True)
    with pytest.raises(ExportError, match="--model-id 'Nanochat_D20'"):
        export_neuronpedia(store, tmp_path / "o2", model_id="Nanochat_D20", quiet=True)
    with pytest.raises(ExportError, match="--created-at"):
        export_neuronpedia(store, tmp_path / "o3", quiet=True, cfg=ExportConfig(created_at="soon"))
    broken = build_store(tmp_path / "b.duckdb", saes=(("blocks.1.hook_resid_post", 1),),
                         n_features=8)
    con = duckdb.connect(str(broken))
    con.execute("UPDATE examples SET token_ids = list_concat([99999], token_ids[2:]) "
                "WHERE feature = 5 AND kind = 'top' AND rank = 2")
    con.close()
    with pytest.raises(ExportError, match=r"blocks\.1\.hook_resid_post feature 5 top example "
                                          r"rank 2: token id 99999 is not in table vocab"):
        export_neuronpedia(broken, tmp_path / "o4", quiet=True)
    assert not (tmp_path / "o4").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o4")]
