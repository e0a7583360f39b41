"""The model config dataclasses refuse values no model can have when they are made, by name: sizes and scales that
are not positive or not finite, NaN anywhere. Such values used to pass and fail later inside torch (a negative Linear,
a NaN init std), or never (a NaN eps). Chained range checks (``0 <= p < 1``) already refused NaN; their cases here
keep it so."""

from __future__ import annotations

import dataclasses
import math

import pytest

from blip_fast.config import BlipConfig, ConfigError, TextConfig, VisionConfig, config_from_dict, config_to_dict


def vision(**values) -> VisionConfig:
    return VisionConfig(**{**dataclasses.asdict(VisionConfig()), **values})


def text(**values) -> TextConfig:
    return TextConfig(**{**dataclasses.asdict(TextConfig()), **values})


@pytest.mark.parametrize("values,match", [
    (dict(mlp_ratio=-1.0), r"VisionConfig\.mlp_ratio must be positive .*got -1\.0"),
    (dict(mlp_ratio=0.0), r"VisionConfig\.mlp_ratio must be positive"),
    (dict(mlp_ratio=math.nan), r"VisionConfig\.mlp_ratio must be positive .*got nan"),
    (dict(mlp_ratio=math.inf), r"VisionConfig\.mlp_ratio must be positive .*got inf"),
    (dict(mlp_ratio=1e-4), r"vision\.mlp_ratio 0\.0001 gives an MLP of no units at width 768"),
    (dict(layer_norm_eps=math.nan), r"VisionConfig\.layer_norm_eps must be positive"),
    (dict(layer_norm_eps=-1e-6), r"VisionConfig\.layer_norm_eps must be positive"),
    (dict(width=2**64, num_heads=1), r"VisionConfig\.width must be positive and at most 2\*\*63 - 1"),
    (dict(drop_path_rate=math.nan), r"vision\.drop_path_rate must be in \[0, 1\); got nan"),
], ids=["negative-mlp", "zero-mlp", "nan-mlp", "inf-mlp", "mlp-of-no-units", "nan-eps", "negative-eps",
        "width-beyond-int64", "nan-drop-path"])
def test_vision_values_no_model_can_have(values, match):
    with pytest.raises(ConfigError, match=match):
        vision(**values)


@pytest.mark.parametrize("values,match", [
    (dict(initializer_range=math.nan), r"TextConfig\.initializer_range must be positive .*got nan"),
    (dict(initializer_range=-0.02), r"TextConfig\.initializer_range must be positive"),
    (dict(initializer_range=math.inf), r"TextConfig\.initializer_range must be positive"),
    (dict(layer_norm_eps=math.nan), r"TextConfig\.layer_norm_eps must be positive"),
    (dict(layer_norm_eps=0.0), r"TextConfig\.layer_norm_eps must be positive"),
    (dict(intermediate_size=-3072), r"TextConfig\.intermediate_size must be positive"),
    (dict(hidden_dropout=math.nan), r"text\.hidden_dropout must be in \[0, 1\); got nan"),
], ids=["nan-init-std", "negative-init-std", "inf-init-std", "nan-eps", "zero-eps", "negative-intermediate",
        "nan-dropout"])
def test_text_values_no_model_can_have(values, match):
    with pytest.raises(ConfigError, match=match):
        text(**values)


@pytest.mark.parametrize("values,match", [
    (dict(temp=math.nan), r"temp must be in \[0\.001, 0\.5\]; got nan"),
    (dict(momentum=math.nan), r"momentum must be in \(0, 1\); got nan"),
    (dict(label_smoothing=math.inf), r"label_smoothing must be in \[0, 1\); got inf"),
], ids=["nan-temp", "nan-momentum", "inf-label-smoothing"])
def test_blip_values_no_model_can_have(values, match):
    with pytest.raises(ConfigError, match=match):
        BlipConfig(**values)


def test_plain_data_with_nan_is_refused_by_name():
    """YAML reads ``.nan`` and JSON ``NaN`` as floats; config_from_dict refuses them as it parses, by key."""
    data = config_to_dict(BlipConfig())
    data["vision"]["mlp_ratio"] = math.nan
    with pytest.raises(ConfigError, match=r"vision\.mlp_ratio must be a finite number; got nan"):
        config_from_dict(BlipConfig, data)


def test_the_published_shapes_pass():
    """The checks refuse nothing BLIP uses: ViT-B and ViT-L (mlp 4.0), BERT-base, the Hugging Face eps of 1e-5."""
    BlipConfig(vision=vision(width=1024, depth=24, num_heads=16, drop_path_rate=0.1, layer_norm_eps=1e-5),
               text=text())
