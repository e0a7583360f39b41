"""Original Salesforce BLIP checkpoints: ``torch.save({'model': state_dict, ...})``.

The files published with the paper (``model_base.pth``, ``model_base_retrieval_coco.pth``,
``model_base_caption_capfilt_large.pth``, ``model_base_vqa_capfilt_large.pth``, ...) hold the
state dict under ``'model'`` with the original key names, which are ours. Files we write add our
configuration under ``'blip_fast_config'``; the original ignores it. Training checkpoints
(``blip_fast.train``) hold the same state dict with the configuration under ``'model_config'``.
Without a configuration it is inferred from the shapes, the number of heads by guess.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import BlipConfig, ConfigError, VisionConfig, architecture, config_from_dict, config_to_dict
from ..models import build_model
from .io import CheckpointError, load_torch, save_torch
from .state import check_config_fits, check_tensors, detect_task, infer_config, load_state, resize_position_embeddings

CONFIG_KEY = "blip_fast_config"
# where the trainer's checkpoints (blip_fast.train) keep the model's BlipConfig; the trainer writes it under this name
TRAINING_CONFIG_KEY = "model_config"


def read_salesforce(path: str | Path) -> tuple[dict[str, torch.Tensor], BlipConfig | None]:
    """The state dict of a Salesforce-format file, and our config if the file carries one."""
    content = load_torch(path)
    if isinstance(content, dict) and "model" in content and isinstance(content["model"], dict):
        state = content["model"]
    elif isinstance(content, dict) and all(isinstance(v, torch.Tensor) for v in content.values()):
        state = content  # a bare state dict
    else:
        raise CheckpointError(f"{path} is not a BLIP checkpoint: expected {{'model': state_dict}}")
    check_tensors(state, str(path))
    configs = {}
    for key in (CONFIG_KEY, TRAINING_CONFIG_KEY):
        if isinstance(content.get(key), dict):
            try:
                configs[key] = config_from_dict(BlipConfig, architecture(content[key]))
            except ConfigError as error:
                raise CheckpointError(f"{path} carries an invalid {key}: {error}") from None
    if len(configs) == 2 and configs[CONFIG_KEY] != configs[TRAINING_CONFIG_KEY]:
        raise CheckpointError(f"{path} carries two different model configs ({CONFIG_KEY} and "
                              f"{TRAINING_CONFIG_KEY}); it is not clear which the weights were trained with")
    return state, next(iter(configs.values()), None)


def load_salesforce(path: str | Path, task: str | None = None, image_size: int | None = None) -> nn.Module:
    """Build the model a Salesforce-format checkpoint holds and load it.

    ``task`` (pretrain | retrieval | caption | vqa) must match the checkpoint's if given;
    ``image_size`` resamples the position embeddings (e.g. 224 -> 384).
    """
    state, config = read_salesforce(path)
    held = detect_task(state)
    if task is not None and task != held:
        raise CheckpointError(f"{path} holds a {held} model, not {task}; load it with task={held!r}")
    if config is None:
        try:
            config = infer_config(state, held)
        except CheckpointError as error:
            raise CheckpointError(f"{path}: {error}") from None
    check_config_fits(config, state, held, str(path))
    if image_size is not None and image_size != config.vision.image_size:
        config.vision = VisionConfig(**{**config.vision.__dict__, "image_size": image_size})
        state = dict(state)
        resize_position_embeddings(state, image_size, config.vision.patch_size)
    model = build_model(held, config)
    load_state(model, state, str(path))
    return model.eval()


def save_salesforce(model: nn.Module, path: str | Path) -> Path:
    """Write ``{'model': state_dict, 'blip_fast_config': ...}`` atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return save_torch({"model": state, CONFIG_KEY: config_to_dict(model.config)}, path)
