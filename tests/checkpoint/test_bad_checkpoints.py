"""Every way a checkpoint can be wrong is a :class:`CheckpointError` (a ``ValueError``) that names
the file and the problem; writes are atomic.

Each case builds the bad input from a real checkpoint (tiny models) and checks the error's type
and the words of its message that a user needs: the path, the missing or unexpected key, the
shapes, the task the file holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import re

import pytest
import torch

from blip_fast.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_hf,
    load_salesforce,
    save_hf,
    save_salesforce,
)
from blip_fast.config import config_to_dict, tiny_config
from blip_fast.models import build_model


@pytest.fixture(scope="module")
def caption_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "caption.pth"
    return save_salesforce(build_model("caption", tiny_config()), path)


def copy_dir(source, target):
    target.mkdir()
    for name in os.listdir(source):
        (target / name).write_bytes((source / name).read_bytes())
    return target


def state_of(path) -> dict:
    return torch.load(path, weights_only=True)


@contextlib.contextmanager
def raises(match: str):
    """Like ``pytest.raises(CheckpointError, match=...)``, but any other exception fails the test with
    an assertion naming it (a raw IndexError from deep inside torch is not an answer for a user)."""
    with pytest.raises(Exception) as info:  # narrowed below
        yield info
    assert isinstance(info.value, CheckpointError), (
        f"raised {type(info.value).__name__}: {info.value!r} instead of a CheckpointError")
    assert re.search(match, str(info.value)), f"message {str(info.value)!r} does not match {match!r}"


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


# ------------------------------------------------------------------ unreadable files


@pytest.mark.parametrize("load", [load_salesforce, load_checkpoint])
def test_missing_file(tmp_path, load):
    with raises(r"checkpoint not found: .*nope\.pth"):
        load(tmp_path / "nope.pth")


def test_empty_file(tmp_path):
    (tmp_path / "empty.pth").touch()
    with raises(r"checkpoint .*empty\.pth is empty"):
        load_salesforce(tmp_path / "empty.pth")


def test_truncated_file(tmp_path, caption_file):
    data = caption_file.read_bytes()
    (tmp_path / "half.pth").write_bytes(data[: len(data) // 2])
    with raises(r"cannot read checkpoint .*half\.pth: .*truncated"):
        load_salesforce(tmp_path / "half.pth")


@pytest.mark.parametrize("text", [
    "these are not the weights you are looking for\n",  # torch.load: IndexError
    "hello world\n",  # torch.load: KeyError
    "version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 990000000\n",  # a Git LFS pointer
    "<html><body>404 Not Found</body></html>\n",
], ids=["prose", "hello", "git-lfs-pointer", "html"])
def test_text_file_renamed_pth(tmp_path, text):
    (tmp_path / "notes.pth").write_text(text)
    with raises(r"(?s)cannot read checkpoint .*notes\.pth.*not a PyTorch checkpoint"):
        load_salesforce(tmp_path / "notes.pth")


class Payload:
    """A pickled object: ``weights_only`` loading must refuse it (it could run code)."""


def test_pickled_code_is_refused(tmp_path):
    content = {"model": {"visual_encoder.cls_token": torch.zeros(1)}, "extra": Payload()}
    torch.save(content, tmp_path / "evil.pth")
    with raises(r"cannot read checkpoint .*evil\.pth"):
        load_salesforce(tmp_path / "evil.pth")


def test_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(2), torch.ones(2)], tmp_path / "list.pth")
    with raises(r"list\.pth is not a BLIP checkpoint: expected \{'model': state_dict\}"):
        load_salesforce(tmp_path / "list.pth")


def test_state_dict_without_an_image_encoder(tmp_path):
    state = {"text_encoder.embeddings.word_embeddings.weight": torch.zeros(4, 2)}
    torch.save({"model": state}, tmp_path / "t.pth")
    with raises("not a BLIP checkpoint: no visual_encoder"):
        load_salesforce(tmp_path / "t.pth")


# ------------------------------------------------------------------ readable files that do not fit


def test_checkpoint_of_another_task(caption_file):
    with raises(r"caption\.pth holds a caption model, not retrieval; load it with task='caption'"):
        load_salesforce(caption_file, task="retrieval")


def test_unexpected_key_is_listed(tmp_path, caption_file):
    content = state_of(caption_file)
    content["model"]["text_decoder.cls.predictions.extra_head.weight"] = torch.zeros(3)
    torch.save(content, tmp_path / "extra.pth")
    with raises(r"(?s)extra\.pth does not fit a BlipCaption.*1 unexpected key.*"
                r"text_decoder\.cls\.predictions\.extra_head\.weight") as error:
        load_salesforce(tmp_path / "extra.pth")
    assert "missing" not in str(error.value)


def test_missing_key_is_listed(tmp_path, caption_file):
    content = state_of(caption_file)
    del content["model"]["text_decoder.bert.encoder.layer.1.crossattention.self.key.bias"]
    del content["model"]["visual_encoder.blocks.0.norm2.weight"]
    torch.save(content, tmp_path / "short.pth")
    with raises(r"(?s)2 missing key.*visual_encoder\.blocks\.0\.norm2\.weight.*"
                r"text_decoder\.bert\.encoder\.layer\.1\.crossattention\.self\.key\.bias") as error:
        load_salesforce(tmp_path / "short.pth")
    assert "unexpected" not in str(error.value)


def test_weight_of_the_wrong_shape(tmp_path, caption_file):
    content = state_of(caption_file)
    content["model"]["text_decoder.bert.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(100, 64)
    torch.save(content, tmp_path / "shape.pth")
    with raises(r"shape\.pth has weights of another shape:\s+"
                r"text_decoder\.bert\.encoder\.layer\.0\.intermediate\.dense\.weight: "
                r"checkpoint \(100, 64\) vs model \(128, 64\)"):
        load_salesforce(tmp_path / "shape.pth")


def test_garbled_blip_fast_config(tmp_path, caption_file):
    """Our own config inside the file is checked too, and reported as a problem of that file."""
    content = state_of(caption_file)
    content["blip_fast_config"] = {**config_to_dict(tiny_config()), "text_width": 64}
    torch.save(content, tmp_path / "config.pth")
    with raises(r"config\.pth.*text_width"):
        load_salesforce(tmp_path / "config.pth")


# ------------------------------------------------------------------ Hugging Face directories


def test_hf_directory_with_broken_config(tmp_path, hf_caption_dir):
    directory = copy_dir(hf_caption_dir, tmp_path / "hf")
    (directory / "config.json").write_text('{"architectures": ["BlipForConditionalGeneration"], ')
    with raises(r"config\.json is not valid JSON"):
        load_hf(directory)


@pytest.mark.parametrize("text", ["[1, 2]", "null", '"BlipForConditionalGeneration"'],
                         ids=["list", "null", "string"])
def test_hf_config_that_is_not_an_object(tmp_path, hf_caption_dir, text):
    directory = copy_dir(hf_caption_dir, tmp_path / "hf")
    (directory / "config.json").write_text(text)
    with raises(r"config\.json"):
        load_hf(directory)


def test_hf_config_with_inconsistent_values(tmp_path, hf_caption_dir):
    """Values no BLIP can have (5 heads for a width of 64) are a problem of that file."""
    directory = copy_dir(hf_caption_dir, tmp_path / "hf")
    config = json.loads((directory / "config.json").read_text())
    config["vision_config"]["num_attention_heads"] = 5
    (directory / "config.json").write_text(json.dumps(config))
    with raises(r"(?s)hf.*num_heads 5"):
        load_hf(directory)


def test_hf_directory_of_another_architecture(tmp_path, hf_caption_dir):
    directory = copy_dir(hf_caption_dir, tmp_path / "hf")
    config = {"architectures": ["BertForMaskedLM"], "model_type": "bert"}
    (directory / "config.json").write_text(json.dumps(config))
    with raises(r"holds \['BertForMaskedLM'\], not one of BlipForImageTextRetrieval"):
        load_hf(directory)


def test_hf_config_without_vision_config(tmp_path, hf_caption_dir):
    directory = copy_dir(hf_caption_dir, tmp_path / "hf")
    config = json.loads((directory / "config.json").read_text())
    del config["vision_config"]
    (directory / "config.json").write_text(json.dumps(config))
    with raises("config.json lacks or garbles 'vision_config'"):
        load_hf(directory)


def test_hf_config_that_does_not_fit_the_weights(tmp_path, hf_caption_dir):
    directory = copy_dir(hf_caption_dir, tmp_path / "hf")
    config = json.loads((directory / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96
    (directory / "config.json").write_text(json.dumps(config))
    with raises(r"(?s)has weights of another shape:.*intermediate\.dense\.weight: "
                r"checkpoint \(128, 64\) vs model \(96, 64\)"):
        load_hf(directory)


def test_hf_truncated_safetensors(tmp_path, hf_caption_dir):
    directory = copy_dir(hf_caption_dir, tmp_path / "hf")
    data = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[: len(data) // 2])
    with raises(r"cannot read the weights in .*hf.*truncated"):
        load_hf(directory)


def test_hf_directory_without_weights(tmp_path, hf_caption_dir):
    directory = copy_dir(hf_caption_dir, tmp_path / "hf")
    (directory / "model.safetensors").unlink()
    with raises("has no model.safetensors"):
        load_hf(directory)


def test_hf_directory_of_another_task(hf_caption_dir):
    with raises(r"holds a caption model \(BlipForConditionalGeneration\), not vqa"):
        load_hf(hf_caption_dir, task="vqa")


def test_directory_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with raises("is not a Hugging Face model directory: no config.json"):
        load_hf(tmp_path)
    with raises("is a directory; a Hugging Face checkpoint directory needs a config.json"):
        load_checkpoint(tmp_path)


# ------------------------------------------------------------------ atomic writes


def test_save_salesforce_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "model.pth"
    first = build_model("caption", tiny_config())
    save_salesforce(first, path)
    before = path.read_bytes()

    real_save = torch.save

    def save_half_then_fail(obj, target, *args, **kwargs):
        real_save(obj, target, *args, **kwargs)
        with open(target, "r+b") as handle:  # as if the disk filled up half-way
            handle.truncate(os.path.getsize(target) // 2)
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_salesforce(build_model("caption", tiny_config()), path)
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == ["model.pth"], "a temporary file was left behind"
    assert path.read_bytes() == before
    loaded = load_salesforce(path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in first.state_dict().items())


def test_save_hf_is_atomic(tmp_path, monkeypatch):
    from blip_fast.checkpoint import huggingface

    first = build_model("caption", tiny_config())
    save_hf(first, tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}

    def fail(state, target, metadata=None):
        (open(target, "wb")).close()
        raise OSError("No space left on device")

    monkeypatch.setattr(huggingface, "save_file", fail)
    with pytest.raises(OSError, match="No space left"):
        save_hf(build_model("caption", tiny_config()), tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before


# ------------------------------------------------------------------ values that are not what the names promise


@pytest.mark.parametrize("value,kind", [([0.0, 1.0], "list"), (None, "NoneType"), ({"w": torch.zeros(1)}, "dict")],
                         ids=["list", "none", "dict"])
def test_non_tensor_values_are_named(tmp_path, caption_file, value, kind):
    content = state_of(caption_file)
    content["model"]["visual_encoder.norm.weight"] = value
    torch.save(content, tmp_path / "values.pth")
    with raises(rf"(?s)values\.pth holds values that are not tensors.*visual_encoder\.norm\.weight \({kind}\)"):
        load_salesforce(tmp_path / "values.pth")


def test_non_float_values_under_float_weights(tmp_path, caption_file):
    """load_state_dict would cast them silently (complex losing its imaginary part)."""
    content = state_of(caption_file)
    state = content["model"]
    state["visual_encoder.norm.weight"] = torch.ones(64, dtype=torch.bool)
    state["visual_encoder.pos_embed"] = torch.complex(state["visual_encoder.pos_embed"],
                                                      torch.ones_like(state["visual_encoder.pos_embed"]))
    state["visual_encoder.norm.bias"] = state["visual_encoder.norm.bias"].to(torch.int8)
    torch.save(content, tmp_path / "ints.pth")
    with raises(r"(?s)ints\.pth has non-floating-point values under floating-point weights:.*"
                r"pos_embed: torch\.complex64.*norm\.weight: torch\.bool.*norm\.bias: torch\.int8"):
        load_salesforce(tmp_path / "ints.pth")


@pytest.mark.parametrize("task,keys", [
    ("caption", ("text_decoder.bert.embeddings.word_embeddings.weight", "text_decoder.cls.predictions.decoder.weight")),
    ("pretrain", ("text_encoder.encoder.layer.0.crossattention.self.key.weight",
                  "text_decoder.bert.encoder.layer.0.crossattention.self.key.weight")),
])
def test_tied_keys_with_different_values(tmp_path, task, keys):
    """Two keys that name one tensor of the model (the LM head and the word embeddings; pretraining's
    shared modules) must agree: loaded one after the other, the later would silently win."""
    state = {k: v.clone() for k, v in build_model(task, tiny_config()).state_dict().items()}
    torch.manual_seed(0)
    for key in keys:
        state[key] = torch.randn_like(state[key])
    torch.save({"model": state, "blip_fast_config": config_to_dict(tiny_config())}, tmp_path / "tied.pth")
    with raises(rf"(?s)tied\.pth holds different values under keys that Blip\w+ ties.*"
                rf"{re.escape(keys[0])} = {re.escape(keys[1])}"):
        load_salesforce(tmp_path / "tied.pth")
    state[keys[1]] = state[keys[0]].clone()  # equal values under both: fine
    torch.save({"model": state, "blip_fast_config": config_to_dict(tiny_config())}, tmp_path / "tied.pth")
    assert torch.equal(load_salesforce(tmp_path / "tied.pth").state_dict()[keys[1]], state[keys[0]])


def test_plain_bert_vocabulary(tmp_path, caption_file):
    """30,522 rows: BERT's vocabulary without BLIP's [DEC] and [ENC] tokens."""
    state = state_of(caption_file)["model"]
    for key in ("text_decoder.bert.embeddings.word_embeddings.weight", "text_decoder.cls.predictions.decoder.weight",
                "text_decoder.cls.predictions.bias", "text_decoder.cls.predictions.decoder.bias"):
        state[key] = state[key][:30522].clone()
    torch.save({"model": state}, tmp_path / "bert.pth")
    with raises(r"bert\.pth: caption checkpoint's text vocabulary has 30522 rows: it lacks BLIP's "
                r"\[DEC\]=30522 and \[ENC\]=30523"):
        load_checkpoint(tmp_path / "bert.pth")


# ------------------------------------------------------------------ training checkpoints


def training_payload(model, config) -> dict:
    """The layout blip_fast.train.engine.Trainer.save writes (other entries trimmed)."""
    return {"model": model.state_dict(), "optimizer": {}, "progress": {}, "data": [], "rng": [], "config": {},
            "model_config": config_to_dict(config)}


def test_training_checkpoint_keeps_its_heads(tmp_path):
    """The tiny model has 4 heads of 16; guessing 64-wide heads from the shapes would give it 1."""
    config = tiny_config()
    torch.save(training_payload(build_model("caption", config), config), tmp_path / "step-00000200.pt")
    loaded = load_checkpoint(tmp_path / "step-00000200.pt")
    assert (loaded.config.vision.num_heads, loaded.config.text.num_heads) == (4, 4)


def test_training_checkpoint_with_two_different_configs(tmp_path):
    config = tiny_config()
    content = training_payload(build_model("caption", config), config)
    content["blip_fast_config"] = {**config_to_dict(config), "embed_dim": 16}
    torch.save(content, tmp_path / "both.pt")
    with raises(r"both\.pt carries two different model configs \(blip_fast_config and model_config\)"):
        load_checkpoint(tmp_path / "both.pt")


def test_guessed_heads_are_logged(tmp_path, caption_file, caplog):
    torch.save({"model": state_of(caption_file)["model"]}, tmp_path / "bare.pth")
    with caplog.at_level("WARNING", logger="blip_fast.checkpoint.state"):
        loaded = load_checkpoint(tmp_path / "bare.pth")
    assert loaded.config.vision.num_heads == 1
    assert "vision width 64 -> 1 heads" in caplog.text and "text width 64 -> 1 heads" in caplog.text


# ------------------------------------------------------------------ Hugging Face configs and weights of the wrong type


def edit_hf_config(directory, edit) -> None:
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.__setitem__("vision_config", [1, 2]), "vision_config is not an object but a list"),
    (lambda c: c["vision_config"].__setitem__("hidden_size", 64.0), r"vision_config\.hidden_size must be an integer"),
    (lambda c: c["text_config"].__setitem__("num_hidden_layers", 2.0),
     r"text_config\.num_hidden_layers must be an integer"),
    (lambda c: c["text_config"].__setitem__("layer_norm_eps", "1e-12"),
     r"text_config\.layer_norm_eps must be a number"),
    (lambda c: c.__setitem__("tie_word_embeddings", False), "has tie_word_embeddings false"),
    (lambda c: c["text_config"].__setitem__("tie_word_embeddings", False), "text_config.tie_word_embeddings false"),
], ids=["vision-config-list", "float-width", "float-layers", "string-eps", "untied", "untied-text"])
def test_hf_config_values_of_the_wrong_type(tmp_path, hf_caption_dir, edit, match):
    directory = copy_dir(hf_caption_dir, tmp_path / "hf")
    edit_hf_config(directory, edit)
    with raises(r"hf/config\.json: .*" + match):
        load_hf(directory)


def test_hf_config_that_is_not_utf8(tmp_path, hf_caption_dir):
    directory = copy_dir(hf_caption_dir, tmp_path / "hf")
    (directory / "config.json").write_bytes(b'{"model_type": "blip", "x": "\xe9"}')
    with raises(r"hf/config\.json is not valid JSON"):
        load_hf(directory)


@pytest.mark.parametrize("name,content,match", [
    ("model.safetensors.index.json", '{"weight_map": ["model-00001.safetensors"]}',
     r"index\.json: weight_map is not an object"),
    ("model.safetensors.index.json", '["weight_map"]', r"cannot read the weights in .*hf"),
    ("pytorch_model.bin", [torch.zeros(1)], r"pytorch_model\.bin is not a state dict but a list"),
    ("pytorch_model.bin", {"visual_encoder.pos_embed": [1.0]},
     r"(?s)pytorch_model\.bin holds values that are not tensors.*pos_embed \(list\)"),
], ids=["weight-map-list", "index-list", "bin-list", "bin-values"])
def test_hf_weight_files_of_the_wrong_shape(tmp_path, hf_caption_dir, name, content, match):
    directory = copy_dir(hf_caption_dir, tmp_path / "hf")
    (directory / "model.safetensors").unlink()
    if isinstance(content, str):
        (directory / name).write_text(content)
    else:
        torch.save(content, directory / name)
    with raises(match):
        load_hf(directory)


# ------------------------------------------------------------------ writes: refused exports, modes, directories


def test_hf_export_refuses_vqa_of_two_widths(tmp_path):
    """transformers' VQA answer decoder cross-attends with the ViT width where ours uses the text width."""
    config = tiny_config()
    config.vision = type(config.vision)(**{**config.vision.__dict__, "width": 128})
    with raises(r"BlipForQuestionAnswering cannot hold a VQA model whose vision width \(128\) differs from its "
                r"text width \(64\)"):
        save_hf(build_model("vqa", config), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_written_files_get_the_usual_modes(tmp_path):
    """Not mkstemp's owner-only 0600: a new file 0o666 less the umask, a replaced file keeps its mode."""
    mask = os.umask(0o022)
    try:
        model = build_model("caption", tiny_config())
        save_salesforce(model, tmp_path / "new.pth")
        (tmp_path / "shared.pth").write_bytes(b"")
        os.chmod(tmp_path / "shared.pth", 0o640)
        save_salesforce(model, tmp_path / "shared.pth")
        save_hf(model, tmp_path / "hf")
    finally:
        os.umask(mask)
    modes = {name: oct(os.stat(tmp_path / name).st_mode & 0o777)
             for name in ("new.pth", "shared.pth", "hf", "hf/model.safetensors", "hf/config.json")}
    assert modes == {"new.pth": "0o644", "shared.pth": "0o640", "hf": "0o755", "hf/model.safetensors": "0o644",
                     "hf/config.json": "0o644"}


def test_save_hf_replaces_the_directory_as_a_whole(tmp_path, monkeypatch):
    """A failure on the second file leaves the old weights and config together, and nothing else."""
    from blip_fast.checkpoint import huggingface

    directory = tmp_path / "hf"
    save_hf(build_model("retrieval", tiny_config()), directory)
    (directory / "tokenizer.json").write_text("{}")  # a file the save does not write is carried over
    before = {name: (directory / name).read_bytes() for name in os.listdir(directory)}
    real = huggingface.atomic_write

    def fail_on_config(path, write):
        if os.path.basename(path) == "config.json":
            raise OSError("No space left on device")
        return real(path, write)

    monkeypatch.setattr(huggingface, "atomic_write", fail_on_config)
    with pytest.raises(OSError, match="No space left"):
        save_hf(build_model("caption", tiny_config()), directory)
    assert {name: (directory / name).read_bytes() for name in os.listdir(directory)} == before
    assert os.listdir(tmp_path) == ["hf"], "a temporary directory was left behind"
    monkeypatch.undo()
    save_hf(build_model("caption", tiny_config()), directory)
    assert load_hf(directory).task == "caption" and (directory / "tokenizer.json").read_text() == "{}"
    assert os.listdir(tmp_path) == ["hf"]
