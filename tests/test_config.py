"""Configs: every file in configs/ validates; bad keys and types fail with the dotted key named."""

import re
from pathlib import Path

import pytest
import yaml

from finemed_ray.config import apply_overrides, load_config, undocumented_fields
from finemed_ray.errors import ConfigError
from finemed_ray.registry import config_class_for, config_classes
from finemed_ray.train.configs import SFTJobConfig

ROOT = Path(__file__).resolve().parents[1]
# configs/baselines/ holds data (published figures), not job configs: tests/test_eval_report.py validates them.
YAMLS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "baselines" not in p.relative_to(ROOT).parts)


def test_every_shipped_config_is_checked_and_every_schema_has_one():
    # The parametrized checks below run once per entry of YAMLS: a config file the glob misses (a ``.yml``, a new
    # suffix) would never be validated, and a registered schema with no shipped file would never be exercised.
    config_files = sorted(p for p in (ROOT / "configs").rglob("*")  # DeepSpeed JSONs: test_deepspeed_config
                          if p.is_file() and p.parent.name not in ("deepspeed", "baselines"))
    assert config_files == YAMLS, f"config files not collected by the YAML checks: {set(config_files) - set(YAMLS)}"
    used = {config_class_for(p) for p in YAMLS}
    missing = {name for name, cls in config_classes().items() if cls not in used}
    assert not missing, f"registered config schemas with no file in configs/: {sorted(missing)}"


def _yaml_leaves(node, path=()):
    """``(path, value)`` for every scalar (or list of scalars) in a parsed YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _yaml_leaves(value, (*path, key))
    elif isinstance(node, list) and node and all(isinstance(v, (dict, list)) for v in node):
        for i, value in enumerate(node):
            yield from _yaml_leaves(value, (*path, i))
    else:
        yield path, node


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_config_file_loads(path):
    cls = config_class_for(path)
    cfg = load_config(cls, path)
    assert type(cfg) is cls
    # Every value written in the file reaches the typed object unchanged: no section ignored, no key silently
    # replaced by its default, renamed or coerced into something else. (Read with plain PyYAML, not the loader.)
    dumped = cfg.model_dump(mode="json")
    for key_path, written in _yaml_leaves(yaml.safe_load(path.read_text())):
        node, dotted = dumped, ".".join(map(str, key_path))
        for part in key_path:
            assert isinstance(node, (dict, list)), f"{path.name}: {dotted} is not in the loaded config"
            assert (part in node) if isinstance(node, dict) else (part < len(node)), \
                f"{path.name}: {dotted} is not in the loaded config"
            node = node[part]
        if isinstance(written, str) and isinstance(node, (int, float)) and not isinstance(node, bool):
            written = float(written)  # YAML 1.1 reads ``1e-5`` as a string; pydantic parses it as a number
        assert node == written, f"{path.name}: {dotted} is {written!r} in the file but {node!r} once loaded"
    if hasattr(cfg, "stage_configs"):  # recipes: every stage must validate as its own stage config
        assert len(cfg.stage_configs()) == len(cfg.stages)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_yaml_key_has_a_comment(path):
    # litgpt habit: a reader of the YAML sees what each key does without opening the code.
    for n, line in enumerate(path.read_text().splitlines(), 1):
        s = line.strip()
        if s and not s.startswith("#") and ":" in s and not s.endswith(":"):
            assert "#" in s, f"{path.name}:{n} has no comment: {s}"


@pytest.mark.parametrize("name", sorted(config_classes()))
def test_every_field_is_documented(name):
    assert undocumented_fields(config_classes()[name]) == []


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        SFTJobConfig,
        ROOT / "configs/sft_tiny.yaml",
        ["train.learning_rate=2e-5", "scaling.num_workers=3", "data.system_prompt=null", "train.report_to=[]"],
    )
    assert cfg.train.learning_rate == 2e-5
    assert cfg.scaling.num_workers == 3
    assert cfg.data.system_prompt is None
    assert cfg.train.report_to == []


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"train\.learning_rat: unknown key"):
        load_config(SFTJobConfig, ROOT / "configs/sft_tiny.yaml", ["train.learning_rat=1e-5"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"scaling\.num_workers: .*integer.*'two'"):
        load_config(SFTJobConfig, ROOT / "configs/sft_tiny.yaml", ["scaling.num_workers=two"])


def test_out_of_range_and_literal_are_named():
    with pytest.raises(ConfigError, match=r"train\.warmup_ratio"):
        load_config(SFTJobConfig, ROOT / "configs/sft_tiny.yaml", ["train.warmup_ratio=1.5"])
    with pytest.raises(ConfigError, match=r"model\.dtype"):
        load_config(SFTJobConfig, ROOT / "configs/sft_tiny.yaml", ["model.dtype=int8"])


def test_missing_required_key_is_named(tmp_path):
    p = tmp_path / "sft_x.yaml"
    p.write_text("run: {name: a, storage_path: /tmp/x}\nmodel: {path: m}\ndata: {path: d}\n")
    with pytest.raises(ConfigError, match=r"output: Field required"):
        load_config(SFTJobConfig, p)


def test_bad_override_syntax_and_files(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["train.learning_rate"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(SFTJobConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "sft_bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(SFTJobConfig, bad)


def test_unsafe_run_name_rejected():
    with pytest.raises(ConfigError, match=r"run\.name"):
        load_config(SFTJobConfig, ROOT / "configs/sft_tiny.yaml", ["run.name=../escape"])


def test_unknown_config_file_prefix():
    with pytest.raises(ConfigError, match="no config schema"):
        config_class_for("configs/whatever.yaml")


def test_recipe_stage_typo_is_named_before_anything_runs():
    from finemed_ray.train.recipe import RecipeConfig

    recipe = load_config(RecipeConfig, ROOT / "configs/recipe_curriculum_tiny.yaml")
    recipe.stages[2].overrides = {"data": {"departmnt": "Surgery"}}
    with pytest.raises(ConfigError, match=r"(?s)stages\[2\] \(stage3-endocrinology\).*data\.departmnt: unknown key"):
        recipe.stage_configs()


def test_recipe_chains_stage_exports():
    from finemed_ray.train.recipe import RecipeConfig

    recipe = load_config(RecipeConfig, ROOT / "configs/recipe_curriculum_tiny.yaml")
    s1, s2, s3 = recipe.stage_configs()
    assert s1.model.path == recipe.base_model
    assert s2.model.path == s1.output.export_path and s3.model.path == s2.output.export_path
    assert s3.data.subdepartment == "Endocrinology" and s1.data.eval_fraction == 0.1
    assert s1.run.name == "curriculum-tiny-stage1-all"


# ----------------------------------------------------------------------------- list-index overrides
RECIPE_LIKE = {
    "name": "r",
    "stages": [
        {"name": "s1", "overrides": {"train": {"epochs": 40}, "data": {"eval_fraction": 0.1}}},
        {"name": "s2", "overrides": {"train": {"epochs": 3, "learning_rate": 1e-3}}},
        {"name": "s3", "overrides": {}},
    ],
    "benchmarks": [{"name": "medqa", "path": "a.jsonl"}, {"name": "pubmedqa", "path": "b.jsonl"}],
    "tags": ["x", "y"],
}


def test_integer_segments_index_existing_lists():
    out = apply_overrides(RECIPE_LIKE, [
        "stages.1.overrides.train.epochs=8",
        "stages.2.overrides.train.epochs=5",  # a new key inside an existing list element's section
        "benchmarks.0.path=s3://x/medqa.jsonl",
        "tags.1=z",  # a scalar list element is replaced
    ])
    assert out["stages"][1]["overrides"]["train"] == {"epochs": 8, "learning_rate": 1e-3}
    assert out["stages"][2]["overrides"] == {"train": {"epochs": 5}}
    assert out["stages"][0] == RECIPE_LIKE["stages"][0]  # other elements untouched
    assert out["benchmarks"] == [{"name": "medqa", "path": "s3://x/medqa.jsonl"},
                                 {"name": "pubmedqa", "path": "b.jsonl"}]
    assert out["tags"] == ["x", "z"]
    assert RECIPE_LIKE["stages"][1]["overrides"]["train"]["epochs"] == 3  # the input is not mutated
    # a whole element can still be replaced, and a whole list still set
    replaced = apply_overrides(RECIPE_LIKE, ["benchmarks.1={name: p, path: q}"])
    assert replaced["benchmarks"][1] == {"name": "p", "path": "q"}
    assert apply_overrides(RECIPE_LIKE, ["tags=[a]"])["tags"] == ["a"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stages.3.overrides.train.epochs=8", r"index 3 in 'stages\.3' is out of range \('stages' has 3 elements"),
        ("benchmarks.2=x", r"index 2 in 'benchmarks\.2' is out of range"),  # no silent append
        ("benchmarks.path=x", r"'benchmarks' is a list; address an element by its index \(indices 0\.\.1\)"),
        ("benchmarks.-1.path=x", r"'benchmarks' is a list"),
        ("name.0=x", r"'name' is a value, not a section or list"),
        ("tags.0.a=x", r"'tags\.0' is a value, not a section"),
        ("stages.0.overrides.0=x", r"'stages\.0\.overrides' is a section, not a list; index 0"),
        ("missing.0.path=x", r"'missing' is not set, so index 0 addresses nothing"),  # no list created from nothing
    ],
)
def test_bad_list_index_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(f"override {override!r}")):
        apply_overrides(RECIPE_LIKE, [override])
    with pytest.raises(ConfigError, match=message):
        apply_overrides(RECIPE_LIKE, [override])


def test_empty_list_index_is_out_of_range():
    with pytest.raises(ConfigError, match=r"index 0 in 'report_to\.0' is out of range .*it is empty"):
        apply_overrides({"report_to": []}, ["report_to.0=tensorboard"])


def test_list_index_overrides_on_real_configs():
    from finemed_ray.eval.config import EvalJobConfig
    from finemed_ray.train.recipe import RecipeConfig

    recipe = load_config(RecipeConfig, ROOT / "configs/recipe_curriculum_tiny.yaml",
                         ["stages.2.overrides.train.epochs=8", "stages.0.name=first"])
    assert recipe.stages[2].overrides["train"]["epochs"] == 8
    assert recipe.stages[2].overrides["train"]["learning_rate"] == 1e-3  # siblings kept
    assert recipe.stages[0].name == "first"
    assert recipe.stage_configs()[2].train.epochs == 8
    ev = load_config(EvalJobConfig, ROOT / "configs/eval_tiny.yaml", ["benchmarks.0.path=s3://x/medqa.jsonl"])
    assert ev.benchmarks[0].path == "s3://x/medqa.jsonl" and ev.benchmarks[1].name == "pubmedqa"
    with pytest.raises(ConfigError, match=r"index 9 in 'stages\.9' is out of range"):
        load_config(RecipeConfig, ROOT / "configs/recipe_curriculum_tiny.yaml", ["stages.9.overrides.train.epochs=8"])
