"""quant.methods' registry: one protocol, one register(); farm registers plugins through it and never
writes into the table."""

from __future__ import annotations

import pytest

from quant import methods
from tests.farm_helpers import FakeConfig, fake_method


def test_the_built_in_methods_and_what_they_declare():
    # the table starts with the built-in methods (plugins, registered later by other tests, follow them)
    builtin = list(methods.METHODS)[:5]
    assert builtin == ["rtn", "smoothquant", "omniquant", "lrl-block", "mobilequant"]
    assert [methods.uses_activation_stats(m) for m in builtin] == [False, True, True, True, True]
    # one method under two names with its own defaults (default_config)
    assert methods.method_config("lrl-block").lrl and not methods.method_config("omniquant").lrl
    with pytest.raises(TypeError):
        methods.METHODS["mine"] = fake_method  # a read-only view: only register() writes the table


def test_register_is_idempotent_and_refuses_clashes_and_non_methods():
    methods.register("fake", fake_method)  # the name the farm tests' sweep files use for the same object
    methods.register("fake", fake_method)
    assert methods.METHODS["fake"] is fake_method and not methods.uses_activation_stats("fake")
    assert methods.method_config("fake", {"label": "x"}) == FakeConfig(label="x")
    with pytest.raises(ValueError, match="'rtn' is already registered as another method"):
        methods.register("rtn", fake_method)
    with pytest.raises(ValueError, match="is not a quantization method: it needs Config \\(a dataclass\\)"):
        methods.register("nothing", object())
    with pytest.raises(ValueError, match="a method needs a name"):
        methods.register(" ", fake_method)
    assert "nothing" not in methods.METHODS


def test_farm_registers_sweep_plugins_through_quant():
    from farm.core.methods import config_dict, method_keys, register_plugins

    register_plugins({"fake": "tests.farm_helpers:fake_method"})
    assert methods.METHODS["fake"] is fake_method
    with pytest.raises(ValueError, match="is not a quantization method"):
        register_plugins({"not-a-method": "tests.farm_helpers:FakeConfig"})
    assert method_keys("fake") == {f for f in FakeConfig.__dataclass_fields__}
    # a trial's id uses Config.identity() where the method has one, the whole dataclass otherwise
    mq = methods.method_config("mobilequant")
    assert config_dict(mq) == mq.identity() and config_dict(FakeConfig()) == {
        k: getattr(FakeConfig(), k) for k in FakeConfig.__dataclass_fields__}
