"""Recipe parsing: strict keys with errors that name the key and list the valid ones; YAML/JSON round trip."""
import json

import pytest

from onnxcomp import Recipe, RecipeError
from onnxcomp.passes import Cleanup, Quantize


def test_default_recipe_is_cleanup_then_dynamic_quantization():
    r = Recipe.parse(None)
    assert [p.name for p in r.passes] == ["cleanup", "quantize"]
    assert r.passes[1].mode == "dynamic"
    assert r.target == "ort-cpu"


@pytest.mark.parametrize("src,want", [
    ({"passes": [{"type": "cleanup", "dedupe": False}], "target": "ort-cpu"}, Cleanup(dedupe=False)),
    ([{"type": "cleanup", "dedupe": False}], Cleanup(dedupe=False)),
    (["cleanup"], Cleanup()),
    ([{"type": "quantize", "mode": "weight_only", "exclude": ["a", "b.*"]}],
     Quantize(mode="weight_only", exclude=("a", "b.*"))),
])
def test_parse_forms(src, want):
    r = Recipe.parse(src)
    assert r == Recipe(passes=(want,), target="ort-cpu")  # every form gives the same typed recipe
    assert Recipe.parse(r.to_dict()) == r  # and round-trips


def test_yaml_and_json_files_round_trip(tmp_path):
    r = Recipe.parse({"passes": [{"type": "cleanup", "fold_transpose": False}],
                      "accuracy_budget": {"cosine": 0.99}})
    y = tmp_path / "r.yaml"
    y.write_text(r.to_yaml())
    j = tmp_path / "r.json"
    j.write_text(r.to_json())
    for path in (y, j, str(y)):
        back = Recipe.parse(path)
        assert back == r
        assert back.passes[0].fold_transpose is False
        assert back.accuracy_budget.cosine == 0.99
    assert json.loads(j.read_text())["passes"][0]["type"] == "cleanup"


def test_unknown_top_level_key_names_it():
    with pytest.raises(RecipeError) as e:
        Recipe.parse({"passes": [], "acuracy_budget": {}})
    assert "acuracy_budget" in str(e.value) and "accuracy_budget" in str(e.value)


def test_unknown_pass_key_names_it_and_lists_valid():
    with pytest.raises(RecipeError) as e:
        Recipe.parse([{"type": "cleanup", "dedup": True}])
    msg = str(e.value)
    assert "dedup" in msg and "dedupe" in msg and "passes[0]" in msg


def test_unknown_pass_type_lists_valid_types():
    with pytest.raises(RecipeError) as e:
        Recipe.parse([{"type": "prune"}])
    assert "'prune'" in str(e.value) and "cleanup" in str(e.value)


def test_bad_values():
    with pytest.raises(RecipeError, match="target"):
        Recipe.parse({"passes": [], "target": "ort-gpu"})
    with pytest.raises(RecipeError, match="expected true/false"):
        Recipe.parse([{"type": "cleanup", "dedupe": "yes"}])
    with pytest.raises(RecipeError, match="cosine"):
        Recipe.parse({"passes": [], "accuracy_budget": {"cosine": 2}})
    with pytest.raises(RecipeError, match="cosin"):
        Recipe.parse({"passes": [], "accuracy_budget": {"cosin": 0.9}})
    with pytest.raises(RecipeError, match="missing 'type'"):
        Recipe.parse([{"dedupe": True}])


def test_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        Recipe.parse(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes: [\n")
    with pytest.raises(RecipeError, match="cannot parse"):
        Recipe.parse(bad)
    txt = tmp_path / "r.txt"
    txt.write_text("passes: []")
    with pytest.raises(RecipeError, match=r"\.yaml"):
        Recipe.parse(txt)


def test_budget_violations():
    from onnxcomp.recipe import AccuracyBudget
    from onnxcomp.validation import OutputError

    def err(name, cosine, max_abs):
        return OutputError(name, [2], "float32", max_abs_err=max_abs, mean_abs_err=0.0, rel_l2_err=0.0, cosine=cosine)

    b = AccuracyBudget(cosine=0.99, max_abs_err=0.1)
    outs = {"a": err("a", 0.995, 0.05), "b": err("b", 0.9, 0.5), "c": err("c", float("nan"), 0.0)}
    v = b.violations(outs)
    assert any(x.startswith("b: cosine") for x in v) and any(x.startswith("b: max_abs_err") for x in v)
    assert any(x.startswith("c: cosine") for x in v)  # NaN never passes
    assert not any(x.startswith("a:") for x in v)
