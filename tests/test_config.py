"""Configs: every file in configs/ validates; bad keys and types fail with the dotted key named."""

from pathlib import Path

import pytest

from finemed_ray.config import apply_overrides, load_config, undocumented_fields
from finemed_ray.errors import ConfigError
from finemed_ray.registry import config_class_for, config_classes
from finemed_ray.train.configs import SFTJobConfig

ROOT = Path(__file__).resolve().parents[1]
YAMLS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_configs_dir_not_empty():
    assert any(p.name == "sft_tiny.yaml" for p in YAMLS)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_config_file_loads(path):
    cfg = load_config(config_class_for(path), path)
    assert cfg.model_dump()  # validated into a typed object
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
