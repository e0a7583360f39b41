"""A pretrained checkpoint into each task model: ours (blip_fast.checkpoint.transfer) against the original's own
``load_checkpoint`` (``models/blip.py``; ``models/blip_nlvr.py`` for NLVR2) on the same file.

The checkpoint is a small pretraining model of ours at 32 px written in the Salesforce format; the task models are
built at 48 px, so both sides resample the position embeddings. Every tensor the checkpoint gave ours must equal the
original's after its load (exactly: the same copies and the same bicubic resampling, up to 1e-6 for the latter), and
what the original's ``load_state_dict`` reports missing must be what ours leaves fresh. Skipped without blip-ci,
failed with ``BLIP_FAST_REQUIRE_ORIGINAL=1``.
"""

import contextlib
import copy
import io
import os

import pytest
import torch
from original_checks import needs_original, original_blip, small_config

from blip_fast.checkpoint import save_salesforce
from blip_fast.checkpoint.transfer import init_from_checkpoint
from blip_fast.models import BlipCaption, BlipNLVR, BlipPretrain, BlipRetrieval, BlipVQA

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def at_48_px(config):
    config = copy.deepcopy(config)
    config.vision.image_size = 48
    return config


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Two pretraining checkpoints (2 and 8 text layers: NLVR2 merges its branches from the 7th layer on)."""
    paths = {}
    for layers in (2, 8):
        torch.manual_seed(layers)
        model = BlipPretrain(small_config(text_layers=layers))
        with torch.no_grad():  # queues and momentum twins that differ from the online weights, as after training
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.01)
        paths[layers] = save_salesforce(model, tmp_path_factory.mktemp("pretrained") / f"pretrain-{layers}.pth")
    return paths


CASES = {  # task: (our model, the original's builder, its load_checkpoint's module, text layers, ViT drop-path)
    "retrieval": (BlipRetrieval, "build_original_retrieval", "blip", 2, 0.0),
    "caption": (BlipCaption, "build_original_caption", "blip", 2, 0.0),
    "vqa": (BlipVQA, "build_original_vqa", "blip", 2, 0.1),
    "nlvr": (BlipNLVR, "build_original_nlvr", "blip_nlvr", 8, 0.1),
}


@needs_original
@pytest.mark.parametrize("task", CASES)
def test_a_pretrained_checkpoint_loads_into_each_task_as_the_original_loads_it(task, pretrained, monkeypatch):
    model_class, builder, loader, layers, drop_path = CASES[task]
    config = at_48_px(small_config(drop_path_rate=drop_path, text_layers=layers))
    torch.manual_seed(1)
    ours = model_class(config)
    report = init_from_checkpoint(ours, pretrained[layers])
    original = getattr(original_blip, builder)(config)
    module = original_blip.load_original_module(loader)
    # blip_nlvr.py calls os.path.isfile without importing os (a NameError in the original, for any local file)
    monkeypatch.setattr(module, "os", os, raising=False)
    with contextlib.redirect_stdout(io.StringIO()):
        _, message = module.load_checkpoint(original, str(pretrained[layers]))
    missing = sorted(k for k in message.missing_keys if not k.endswith("position_ids"))
    assert missing == sorted(report.fresh)
    theirs = original.state_dict()
    fresh = set(report.fresh)
    compared = 0
    for key, value in ours.state_dict().items():
        if key in fresh:
            continue
        tolerance = 1e-6 if key.endswith("pos_embed") else 0.0
        torch.testing.assert_close(value, theirs[key], rtol=0, atol=tolerance, msg=key)
        compared += 1
    assert compared == report.loaded > 0
    assert "visual_encoder.pos_embed" in report.resized
