"""blip_fast.checkpoint.transfer: a trained checkpoint of one task into a model of another (fine-tuning's start).

The comparison with the original's own loading is tests/test_original_transfer.py; here, what a user relies on
without it: which tensors come from where, what stays fresh, NLVR2's twin branches, resampled position embeddings,
momentum twins that follow the loaded weights, and a clear error for another architecture.
"""

import copy

import pytest
import torch

from blip_fast.checkpoint import CheckpointError, save_salesforce
from blip_fast.checkpoint.transfer import init_from_checkpoint
from blip_fast.config import tiny_config
from blip_fast.models import BlipCaption, BlipNLVR, BlipPretrain, BlipRetrieval, BlipVQA
from blip_fast.models.vit import position_embedding_for


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    torch.manual_seed(0)
    model = BlipPretrain(tiny_config())
    with torch.no_grad():  # momentum twins and queues unlike a fresh model's
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.01)
        model.image_queue.mul_(-1)
    path = save_salesforce(model, tmp_path_factory.mktemp("pretrained") / "pretrain.pth")
    return model, path


def same(a, b):
    return torch.equal(a, b)


def test_retrieval_takes_encoders_momentum_twins_and_queues(pretrained):
    source, path = pretrained
    model = BlipRetrieval(tiny_config())
    report = init_from_checkpoint(model, path)
    held = source.state_dict()
    for key, value in model.state_dict().items():
        if key in ("idx_queue", "ptr_queue"):
            continue
        assert same(value, held[key]), key
    assert sorted(report.fresh) == ["idx_queue", "ptr_queue"]
    assert (model.idx_queue == -100).all()
    assert any(k.startswith("text_decoder.") for k in report.unused)
    lines = report.lines()
    assert len(lines) == 3 and "left fresh (2): idx_queue, ptr_queue" in lines[1]


def test_vqa_takes_encoder_and_decoder_and_captioner_the_decoder(pretrained):
    source, path = pretrained
    held = source.state_dict()
    vqa = BlipVQA(tiny_config())
    assert init_from_checkpoint(vqa, path).fresh == []  # the tiny ViT is as wide as the text: the decoder fits
    for key, value in vqa.state_dict().items():
        assert same(value, held[key]), key
    caption = BlipCaption(tiny_config())
    report = init_from_checkpoint(caption, path)
    assert report.fresh == []
    assert same(caption.text_decoder.bert.encoder.layer[1].attention.self.query.weight,
                source.text_decoder.bert.encoder.layer[1].attention.self.query.weight)


def test_nlvr_branches_both_start_as_the_pretrained_cross_attention(pretrained):
    source, path = pretrained
    config = tiny_config()
    config.text.num_layers = 2
    model = BlipNLVR(config)
    fresh_head = copy.deepcopy(model.cls_head.state_dict())
    report = init_from_checkpoint(model, path)
    for ours, theirs in zip(model.text_encoder.encoder.layer, source.text_encoder.encoder.layer, strict=True):
        for branch in (ours.crossattention.self0, ours.crossattention.self1):
            assert same(branch.key.weight, theirs.crossattention.self.key.weight)
            assert same(branch.query.bias, theirs.crossattention.self.query.bias)
        for dense in (ours.crossattention.output.dense0, ours.crossattention.output.dense1):
            assert same(dense.weight, theirs.crossattention.output.dense.weight)
        assert same(ours.crossattention.output.LayerNorm.weight, theirs.crossattention.output.LayerNorm.weight)
    assert sorted(report.fresh) == sorted(f"cls_head.{k}" for k in fresh_head)
    assert all(same(v, model.cls_head.state_dict()[k]) for k, v in fresh_head.items())
    assert any(".crossattention.self." in k for k in report.unused)
    assert "unused from the checkpoint" in report.lines()[2] and "crossattention" in report.lines()[2]


def test_position_embeddings_are_resampled_to_the_task_image_size(pretrained):
    source, path = pretrained
    model = BlipRetrieval(tiny_config(image_size=96))
    report = init_from_checkpoint(model, path)
    assert report.resized == ["visual_encoder.pos_embed", "visual_encoder_m.pos_embed"]
    expected = position_embedding_for(source.visual_encoder.pos_embed.detach(), (6, 6))
    torch.testing.assert_close(model.visual_encoder.pos_embed.detach(), expected, rtol=0, atol=0)
    expected_m = position_embedding_for(source.visual_encoder_m.pos_embed.detach(), (6, 6))
    torch.testing.assert_close(model.visual_encoder_m.pos_embed.detach(), expected_m, rtol=0, atol=0)


def test_momentum_twins_a_checkpoint_lacks_follow_the_loaded_weights(tmp_path, pretrained):
    source, _ = pretrained
    captioner = BlipCaption(tiny_config())
    captioner.visual_encoder.load_state_dict(source.visual_encoder.state_dict())
    path = save_salesforce(captioner, tmp_path / "caption.pth")
    model = BlipRetrieval(tiny_config())
    report = init_from_checkpoint(model, path)
    for name, param in model.visual_encoder_m.named_parameters():
        assert same(param, source.visual_encoder.get_parameter(name)), name
    # the caption checkpoint has no text encoder: it and its momentum twin stay as initialised, equal to each other
    assert "text_encoder.embeddings.word_embeddings.weight" in report.fresh
    words = model.text_encoder.embeddings.word_embeddings.weight
    assert same(model.text_encoder_m.embeddings.word_embeddings.weight, words)


def test_another_architecture_is_refused_before_anything_loads(pretrained):
    _, path = pretrained
    config = tiny_config()
    config.text.num_layers = 3
    model = BlipRetrieval(config)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointError, match=r"another architecture.*text.num_layers 2 \(this model: 3\)"):
        init_from_checkpoint(model, path)
    assert all(same(v, model.state_dict()[k]) for k, v in before.items())
