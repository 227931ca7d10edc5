import re
from pathlib import Path

import pytest
import yaml
from support import REPO_ROOT

from histolite.config import (
    TrainConfig,
    apply_overrides,
    config_reference,
    dump_config,
    load_config,
)
from histolite.errors import ConfigError

RECIPES = sorted((REPO_ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_validates(path: Path) -> None:
    cfg = load_config(path, ["data.root=/tmp/somewhere"])
    assert isinstance(cfg, TrainConfig)


def test_overrides_are_typed(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  root: /x\n")
    cfg = load_config(
        path,
        [
            "trainer.max_epochs=3",
            "augment.vflip=true",
            "data.stain={target: t.json}",
            "model.weights=null",
        ],
    )
    assert cfg.trainer.max_epochs == 3 and cfg.augment.vflip is True
    assert cfg.data.stain.target == "t.json"
    roundtrip = load_config(None, [f"data.root={cfg.data.root}"])
    assert roundtrip.data.root == "/x"
    assert "max_epochs: 3" in dump_config(cfg)


def test_a_recipes_stain_target_is_relative_to_the_recipe(tmp_path: Path) -> None:
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    path = recipes / "c.yaml"
    path.write_text("data:\n  root: /x\n  stain:\n    target: stain/t.json\n")
    cfg = load_config(path)
    assert Path(cfg.data.stain.target) == (recipes / "stain" / "t.json").resolve()
    overridden = load_config(path, ["data.stain.target=mine.json"])
    assert overridden.data.stain.target == "mine.json"  # --set stays relative to the caller
    assert load_config(path, ["data.stain.target=/abs/t.json"]).data.stain.target == "/abs/t.json"
    # a run's saved config.yaml is not a recipe: a --set target stays as the user gave it
    saved = recipes / "run_config.yaml"
    saved.write_text("data:\n  root: /x\n  stain:\n    target: mine.json\n")
    assert load_config(saved, recipe=False).data.stain.target == "mine.json"


def test_kather_recipes_share_one_shipped_stain_target() -> None:
    targets = {
        load_config(
            REPO_ROOT / "configs" / f"kather2016_{name}.yaml", ["data.root=/x"]
        ).data.stain.target
        for name in ("pretrained_teacher", "student", "student_kd", "student_multipart")
    }
    assert len(targets) == 1 and Path(targets.pop()).is_file()


def test_unknown_key_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  root: /x\n  imgsize: 3\n")
    with pytest.raises(ConfigError, match=r"data\.imgsize: unknown key"):
        load_config(path)
    path.write_text("data:\n  root: /x\n")
    with pytest.raises(ConfigError, match=r"trainer\.epochs: unknown key"):
        load_config(path, ["trainer.epochs=3"])


def test_bad_values_and_malformed_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  root: /x\noptimizer:\n  name: rmsprop\n")
    with pytest.raises(ConfigError, match=r"optimizer\.name"):
        load_config(path)
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path)
    path.write_text("seed: 1\n")
    with pytest.raises(ConfigError, match=r"data\.root"):
        load_config(path)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["no_equals_sign"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_a_sections_own_check_prints_its_rule_not_the_whole_input(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\nmodel: {name: resnet8}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "(top level): set data.root" in message and "resnet8" not in message


def _keys(section: dict, prefix: str = "") -> set[str]:
    keys = set()
    for name, value in section.items():
        keys.add(prefix + name)
        if isinstance(value, dict):
            keys |= _keys(value, f"{prefix}{name}.")
    return keys


def test_the_config_reference_is_current_and_names_every_key() -> None:
    reference = config_reference()
    written = (REPO_ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert written == reference, "docs/config.md is stale: histolite config reference > it"
    # every key of every shipped recipe is in the reference, with its dotted name
    for path in RECIPES:
        for key in _keys(yaml.safe_load(path.read_text(encoding="utf-8"))):
            assert f"| `{key}` |" in reference, (path.name, key)
    assert "| `distill.crossfit_targets` | out_of_fold \\| ensemble | `out_of_fold` |" in reference
    assert "| `data.stain.target` | str | required |" in reference


def test_the_readmes_config_block_uses_real_keys() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Config format.*?```yaml\n(.*?)```", readme, re.S)
    assert block is not None
    documented = _keys(yaml.safe_load(block.group(1)))
    unknown = [key for key in sorted(documented) if f"| `{key}` |" not in config_reference()]
    assert not unknown, f"README's config block names keys the loader rejects: {unknown}"
    assert {"distill.crossfit_targets", "crossfit", "trainer.checkpoint_every"} <= documented
