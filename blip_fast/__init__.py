"""blip_fast: the fastest correct implementation of BLIP (Li et al., 2022).

    import blip_fast
    blip = blip_fast.load("model_base_retrieval_coco.pth")
    blip.similarity(["dog.jpg"], ["a dog on the grass", "a red car"])

See :mod:`blip_fast.api` for the user API, :mod:`blip_fast.models` for the models,
:mod:`blip_fast.ops` for the hot operations and their reference implementations.
"""

from .api import Blip, load
from .checkpoint import CheckpointError, load_checkpoint
from .config import BlipConfig, ConfigError, preset
from .models import build_model

__version__ = "0.1.0"

__all__ = ["Blip", "BlipConfig", "CheckpointError", "ConfigError", "build_model", "load", "load_checkpoint",
           "preset"]
