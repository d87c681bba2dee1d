"""Every recipe in recipes/ parses and its passes validate, in order, against the reference model's config."""

from pathlib import Path

import pytest

from moecompress.arch.adapter import adapter_for_config_dict
from moecompress.recipe import load_recipe
from moecompress.runner import planned_config
from moecompress.zoo.reference import reference_config

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_validates(path):
    parsed = load_recipe(path)
    assert parsed.passes and parsed.model == "artifacts/reference"
    hf = reference_config(1024, hidden=128, layers=4, experts=16, top_k=2, expert_width=128, heads=4,
                          seqlen=256).to_dict()
    adapter = adapter_for_config_dict(hf)
    for cfg in parsed.passes:
        cfg.check(adapter, hf)
        hf = planned_config(cfg, adapter, hf)
