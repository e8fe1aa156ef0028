"""The offline validator: accepts our export, rejects each single corruption by file/line/key."""

import json
import math
import shutil

import pytest

from atlas.neuronpedia import API_DIR, export_neuronpedia
from atlas.neuronpedia_validate import validate
from scripts import neuronpedia_validate
from tests.np_fixtures import build_store, read_jsonl, write_jsonl

SRC = "nanochat-d20/4-atlas-res-40"
OTHER = "nanochat-d20/10-atlas-res-40"
FEATURES = f"{SRC}/features/batch-0.jsonl.gz"
ACTIVATIONS = f"{SRC}/activations/batch-0.jsonl.gz"
EXPLANATIONS = f"{SRC}/explanations/batch-0.jsonl.gz"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("npv")
    store = build_store(root / "features.duckdb", n_top=6, per_bin=2)
    out = root / "export"
    export_neuronpedia(store, out, quiet=True)
    return out


@pytest.fixture
def export(pristine, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(pristine, out)
    return out


def edit(root, rel, line, fn):
    """Apply `fn` to the row on 1-based `line` of a JSONL file and write the file back."""
    rows = read_jsonl(root / rel)
    fn(rows[line - 1])
    write_jsonl(root / rel, rows)


def errors(root):
    return [p for p in validate(root) if p.severity == "error"]


def assert_reported(problems, path, line, key, words):
    found = [p for p in problems if (p.path, p.line, p.key) == (path, line, key)]
    assert found, f"no error at {path}:{line} {key}; got {[str(p) for p in problems][:8]}"
    assert any(words in p.message for p in found), [p.message for p in found]


def test_accepts_our_export(pristine):
    assert validate(pristine) == []
    assert neuronpedia_validate.main([str(pristine)]) == 0


def test_key_missing_on_one_line(export):
    edit(export, FEATURES, 3, lambda r: r.pop("pos_values"))
    assert_reported(errors(export), FEATURES, 3, "pos_values", "missing (line 1 has it)")


def test_key_missing_from_the_first_line(export):
    edit(export, ACTIVATIONS, 1, lambda r: r.pop("binContains"))
    problems = errors(export)
    assert_reported(problems, ACTIVATIONS, 1, "binContains", "missing")
    assert_reported(problems, ACTIVATIONS, 2, "binContains", "not on line 1")


def test_tokens_and_values_lengths_differ(export):
    edit(export, ACTIVATIONS, 5, lambda r: r["values"].pop())
    assert_reported(errors(export), ACTIVATIONS, 5, "values", "entries, tokens has")


def test_nan_is_reported_with_its_position(export):
    def poison(r):
        r["values"][3] = math.nan
    edit(export, ACTIVATIONS, 2, poison)
    assert_reported(errors(export), ACTIVATIONS, 2, "values[3]", "not a finite number")


def test_infinity_in_a_feature_row(export):
    edit(export, FEATURES, 7, lambda r: r.update(frac_nonzero=math.inf))
    assert_reported(errors(export), FEATURES, 7, "frac_nonzero", "not a finite number")


def test_nul_character(export):
    def poison(r):
        r["tokens"][1] = "a\x00b"
    edit(export, ACTIVATIONS, 4, poison)
    assert_reported(errors(export), ACTIVATIONS, 4, "tokens[1]", "\\u0000")


def test_literal_backslash_u0000_that_the_importer_would_mangle(export):
    rows = read_jsonl(export / EXPLANATIONS)
    rows[1]["description"] = "x\\u0000y"
    # written as Python's json does (x\\u0000y), not escaped as the exporter does
    write_jsonl(export / EXPLANATIONS, rows, raw_lines={1: json.dumps(rows[1])})
    assert_reported(errors(export), EXPLANATIONS, 2, "description", "\\u0000")


@pytest.mark.parametrize("rel,line,key,value,words", [
    (ACTIVATIONS, 6, "id", "not-an-id", "25-character"),
    (FEATURES, 2, "index", "01", "decimal string"),
    (FEATURES, 2, "index", "40", "not below d_sae 40"),
    (FEATURES, 9, "modelId", "Nanochat_D20", "expected 'nanochat-d20'"),
    (ACTIVATIONS, 3, "layer", "4-other-set", "expected the source id"),
    (FEATURES, 4, "sourceSetName", "other", "expected 'atlas-res-40'"),
])
def test_bad_ids(export, rel, line, key, value, words):
    edit(export, rel, line, lambda r: r.update({key: value}))
    assert_reported(errors(export), rel, line, key, words)


def test_dangling_feature_reference(export):
    edit(export, ACTIVATIONS, 7, lambda r: r.update(index="999"))
    assert_reported(errors(export), ACTIVATIONS, 7, "index", "not in features/")


def test_explanation_of_a_missing_feature(export):
    rows = read_jsonl(export / FEATURES)
    assert rows[-1]["index"] == "39"
    write_jsonl(export / FEATURES, rows[:-1])
    edit(export, EXPLANATIONS, 1, lambda r: r.update(index="39"))
    assert_reported(errors(export), EXPLANATIONS, 1, "index", "not in features/")


def test_duplicate_activation_id_across_sources(export):
    first = read_jsonl(export / ACTIVATIONS)[0]["id"]
    edit(export, f"{OTHER}/activations/batch-0.jsonl.gz", 3, lambda r: r.update(id=first))
    assert_reported(errors(export), f"{OTHER}/activations/batch-0.jsonl.gz", 3, "id", "duplicates")


@pytest.mark.parametrize("rel,line,mutate,key,words", [
    (ACTIVATIONS, 8, lambda r: r.update(maxValue=r["maxValue"] + 1), "maxValue", "max(values)"),
    (ACTIVATIONS, 8, lambda r: r.update(maxValueTokenIndex=999), "maxValueTokenIndex",
     "position of max"),
    (ACTIVATIONS, 8, lambda r: r.update(binContains=1.5), "binContains", "[0, 1] or -1"),
    (ACTIVATIONS, 8, lambda r: r.update(tokens=[], values=[]), "tokens", "expected 1..1024"),
    (FEATURES, 5, lambda r: r["freq_hist_data_bar_heights"].pop(), "freq_hist_data_bar_heights",
     "expected 50 each"),
    (FEATURES, 5, lambda r: r["neg_values"].pop(), "neg_values", "neg_str has"),
    (FEATURES, 5, lambda r: r.update(frac_nonzero=1.5), "frac_nonzero", "not in [0, 1]"),
    (FEATURES, 5, lambda r: r.update(topkCosSimValues=[0.5]), "topkCosSimValues",
     "lengths differ"),
    (EXPLANATIONS, 2, lambda r: r.update(description="x" * 513), "description", "1..512"),
    (EXPLANATIONS, 2, lambda r: r.update(description=""), "description", "1..512"),
])
def test_array_and_value_rules(export, rel, line, mutate, key, words):
    edit(export, rel, line, mutate)
    assert_reported(errors(export), rel, line, key, words)


def test_metadata_files(export):
    model = export / SRC / "model.jsonl"
    model.write_text(model.read_text() * 2)
    edit(export, f"{SRC}/source.jsonl", 1, lambda r: r.update(extra="x"))
    (export / SRC / "release.jsonl").unlink()
    edit(export, f"{OTHER}/sourceset.jsonl", 1, lambda r: r.pop("showUmap"))
    problems = [str(p) for p in errors(export)]
    assert f"error: {SRC}/model.jsonl: has 2 lines, expected exactly 1" in problems
    assert f"error: {SRC}/source.jsonl:1: extra: is not a column of the schema" in problems
    assert f"error: {SRC}/release.jsonl: missing" in problems
    assert f"error: {OTHER}/sourceset.jsonl:1: showUmap: missing" in problems


def test_structure_problems(export):
    shutil.rmtree(export / SRC / "activations")
    (export / OTHER / "features" / "batch-0.jsonl.gz").write_bytes(b"not gzip")
    problems = [str(p) for p in errors(export)]
    assert f"error: {SRC}/activations: missing" in problems
    unreadable = f"error: {OTHER}/features/batch-0.jsonl.gz: cannot read"
    assert any(p.startswith(unreadable) for p in problems)


def test_manifest_catches_changed_files(export):
    (export / SRC / "model.jsonl").write_text((export / SRC / "model.jsonl").read_text().replace(
        '"layers":20', '"layers":21'))
    assert_reported(errors(export), f"{SRC}/model.jsonl", None, None, "sha256 differs")


def test_api_payload_limits(export):
    api = export / API_DIR
    plan = json.loads((api / "plan.json").read_text())
    batch_file = next(r["file"] for r in plan["requests"]
                      if r["endpoint"] == "feature/upload-batch")
    body = json.loads((api / batch_file).read_text())
    body["features"][0]["topLogits"] *= 3
    body["features"][1]["activations"][0]["values"].append(1.0)
    body["features"][2]["activations"] = []
    body["features"][3]["index"] = body["features"][4]["index"]
    body["features"][5]["density"] = 2
    (api / batch_file).write_text(json.dumps(body))
    model = json.loads((api / plan["requests"][0]["file"]).read_text())
    model["layers"] = 500
    (api / plan["requests"][0]["file"]).write_text(json.dumps(model))
    rel = f"{API_DIR}/{batch_file}"
    problems = errors(export)
    assert_reported(problems, rel, None, "features[0].topLogits", "at most 20")
    assert_reported(problems, rel, None, "features[1].activations[0].values", "values for")
    assert_reported(problems, rel, None, "features[2].activations", "at least one")
    assert_reported(problems, rel, None, "features[4].index", "appears twice")
    assert_reported(problems, rel, None, "features[5].density", "not in [0, 1]")
    assert_reported(problems, f"{API_DIR}/{plan['requests'][0]['file']}", None, "layers", "1..127")


def test_api_feature_missing_from_the_bulk_export(export):
    api = export / API_DIR
    plan = json.loads((api / "plan.json").read_text())
    req = next(r for r in plan["requests"] if r["endpoint"] == "feature/upload-batch")
    body = json.loads((api / req["file"]).read_text())
    body["features"][0]["index"] = 77
    req["indices"][0] = 77
    (api / req["file"]).write_text(json.dumps(body))
    (api / "plan.json").write_text(json.dumps(plan))
    assert_reported(errors(export), f"{API_DIR}/{req['file']}", None, "features[0].index",
                    "not in the bulk export")


def test_cli_names_file_line_and_key(export, capsys):
    edit(export, ACTIVATIONS, 5, lambda r: r["values"].pop())
    assert neuronpedia_validate.main([str(export)]) == 1
    out = capsys.readouterr()
    assert f"error: {ACTIVATIONS}:5: values: has " in out.out
    assert "errors" in out.err
