import pytest

from vlmkit.config import VisionConfig, VLMConfig, config_from_dict, config_to_dict
from vlmkit.errors import ConfigError


def test_nested_round_trip_and_errors():
    config = VLMConfig(vision=VisionConfig(source="x", feature_layer=[-2, -1]), image_token_id=7)
    again = config_from_dict(VLMConfig, config_to_dict(config))
    assert again == config
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) vision\.layer; valid keys: vision\.source"):
        config_from_dict(VLMConfig, {"vision": {"layer": 3}})
    with pytest.raises(ConfigError, match=r"vision\.select_strategy: 'cls' is not one of 'auto', 'default', 'full'"):
        config_from_dict(VLMConfig, {"vision": {"select_strategy": "cls"}})
    with pytest.raises(ConfigError, match="expected a mapping"):
        config_from_dict(VLMConfig, [1, 2])


def test_optional_literal_fields_are_checked_too():
    """``Literal[...] | None`` (None meaning "keep the default") refuses other values, and still takes None."""
    from vlmkit.training.config import ModelSpec

    with pytest.raises(ConfigError, match=r"model\.image_layout: 'sideways' is not one of 'as_written', 'after_each_q"):
        config_from_dict(ModelSpec, {"checkpoint": "x", "image_layout": "sideways"}, "model.")
    assert config_from_dict(ModelSpec, {"checkpoint": "x", "image_layout": None}).image_layout is None
    assert config_from_dict(ModelSpec, {"checkpoint": "x", "image_layout": "after_each_question"}).image_layout == (
        "after_each_question"
    )
