"""BLIP's models: the ViT, the MED text transformer and the five task models."""

from .blip_caption import BlipCaption
from .blip_nlvr import BlipNLVR
from .blip_pretrain import BlipPretrain
from .blip_retrieval import BlipRetrieval
from .blip_vqa import BlipVQA
from .generation import GenerationConfig, generate

TASK_MODELS = {"pretrain": BlipPretrain, "retrieval": BlipRetrieval, "caption": BlipCaption, "vqa": BlipVQA,
               "nlvr": BlipNLVR}


def build_model(task: str, config):
    """A randomly initialised model for ``task`` (pretrain | retrieval | caption | vqa | nlvr)."""
    if task not in TASK_MODELS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASK_MODELS)}")
    return TASK_MODELS[task](config)


__all__ = ["TASK_MODELS", "BlipCaption", "BlipNLVR", "BlipPretrain", "BlipRetrieval", "BlipVQA", "GenerationConfig",
           "build_model", "generate"]
