"""A checkpoint is data from a download: its config, its key names, its index and its values are checked before
they size an allocation, name a file to open, or reach the model.

Each case edits a tiny checkpoint the way a corrupted or hostile file would, and expects one
:class:`CheckpointError` naming the problem. Loads that could allocate what a config asks for run under
``small_address_space``: there an allocation of gigabytes fails at once in the allocator (an error that is not a
CheckpointError fails the test) instead of swapping or waking the OOM killer.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import resource
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from blip_fast.checkpoint import CheckpointError, load_checkpoint, load_hf, load_salesforce
from blip_fast.config import config_to_dict, tiny_config
from blip_fast.models import build_model


@pytest.fixture(scope="module")
def caption_state():
    return build_model("caption", tiny_config()).state_dict()


@pytest.fixture
def small_address_space():
    """At most 2 GiB of address space beyond what the process holds now, for the test's duration (Linux)."""
    status = Path("/proc/self/status")
    if not status.exists():
        yield
        return
    used = next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines() if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = used + 2**31 if hard == resource.RLIM_INFINITY else min(used + 2**31, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def raises(match: str, within: float | None = None):
    """A CheckpointError whose message matches ``match`` (any other exception fails the test, naming it), raised
    within ``within`` seconds if given."""
    start = time.perf_counter()
    with pytest.raises(Exception) as info:  # narrowed below
        yield info
    elapsed = time.perf_counter() - start
    assert isinstance(info.value, CheckpointError), (
        f"raised {type(info.value).__name__}: {str(info.value)[:300]!r} instead of a CheckpointError")
    assert re.search(match, str(info.value)), f"message {str(info.value)!r} does not match {match!r}"
    assert within is None or elapsed < within, f"took {elapsed:.2f} s to refuse"


def save_with_config(path, state, edit_config=None, key="blip_fast_config"):
    config = config_to_dict(tiny_config())
    if edit_config:
        edit_config(config)
    torch.save({"model": dict(state), key: config}, path)
    return path


def set_text(**values):
    return lambda config: config["text"].update(values)


def set_vision(**values):
    return lambda config: config["vision"].update(values)


def edit_hf(source, target, edit):
    target.mkdir()
    for name in os.listdir(source):
        (target / name).write_bytes((source / name).read_bytes())
    config = json.loads((target / "config.json").read_text())
    edit(config)
    (target / "config.json").write_text(json.dumps(config))
    return target


# ------------------------------------------------------------------ sizes in a Salesforce file's config


@pytest.mark.parametrize("key", ["blip_fast_config", "model_config"])
def test_a_vocabulary_of_a_trillion_is_refused_before_allocating(tmp_path, caption_state, small_address_space, key):
    path = save_with_config(tmp_path / "vocab.pth", caption_state, set_text(vocab_size=10**12), key)
    with raises(r"(?s)vocab\.pth has weights of another shape:.*word_embeddings\.weight: "
                r"checkpoint \(30524, 64\) vs model \(1000000000000, 64\)", within=1.0):
        load_salesforce(path)


def test_more_layers_than_the_weights_hold_are_refused(tmp_path, caption_state, small_address_space):
    """65536 wide and 64 layers deep (some 200 GB) against a file of two 64-wide layers."""
    path = save_with_config(tmp_path / "deep.pth", caption_state,
                            set_text(hidden_size=65536, num_heads=1024, num_layers=64, intermediate_size=262144))
    with raises(r"deep\.pth: the config has text\.num_layers 64, but the weights hold 2 "
                r"text_decoder\.bert\.encoder\.layer\.N", within=1.0):
        load_salesforce(path)


def test_a_wider_text_than_the_weights_is_refused(tmp_path, caption_state, small_address_space):
    path = save_with_config(tmp_path / "wide.pth", caption_state, set_text(hidden_size=65536, num_heads=1024))
    with raises(r"(?s)has weights of another shape:.*position_embeddings\.weight: checkpoint \(64, 64\) vs model "
                r"\(64, 65536\)", within=1.0):
        load_salesforce(path)


def test_a_size_whose_weight_is_missing_is_not_trusted(tmp_path, caption_state, small_address_space):
    state = dict(caption_state)
    del state["text_decoder.bert.embeddings.word_embeddings.weight"]
    path = save_with_config(tmp_path / "short.pth", state, set_text(vocab_size=10**12))
    with raises(r"(?s)short\.pth lacks weights that show the sizes of its model:.*1 missing key.*"
                r"text_decoder\.bert\.embeddings\.word_embeddings\.weight", within=1.0):
        load_salesforce(path)


@pytest.mark.parametrize("edit,match", [
    (set_vision(image_size=2**20), r"visual_encoder\.pos_embed: checkpoint \(1, 17, 64\) vs model "
                                   r"\(1, 4294967297, 64\)"),
    (set_vision(mlp_ratio=2**20), r"visual_encoder\.blocks\.0\.mlp\.fc1\.weight: checkpoint \(256, 64\) vs model "
                                  r"\(67108864, 64\)"),
    (set_vision(depth=64, width=65536, num_heads=1024),
     r"the config has vision\.depth 64, but the weights hold 2 visual_encoder\.blocks\.N"),
], ids=["image-size", "mlp-ratio", "deep-and-wide"])
def test_vision_sizes_are_checked_before_allocating(tmp_path, caption_state, small_address_space, edit, match):
    path = save_with_config(tmp_path / "vision.pth", caption_state, edit)
    with raises(match, within=1.0):
        load_salesforce(path)


def test_the_depth_inferred_from_key_names_is_checked(tmp_path, caption_state, small_address_space):
    """Key names are data too: without a config, a block index of 10**9 would make a billion blocks."""
    state = dict(caption_state)
    state["visual_encoder.blocks.999999999.norm1.weight"] = torch.ones(64)
    torch.save({"model": state}, tmp_path / "index.pth")
    with raises(r"the config has vision\.depth 1000000000, but the weights hold 3 visual_encoder\.blocks", within=1.0):
        load_salesforce(tmp_path / "index.pth")


def test_fresh_queues_longer_than_the_original_are_refused(tmp_path, small_address_space):
    """A retrieval file without its queues: their length is no weight's shape, and a queue of 10**12 is 256 TB."""
    state = {k: v for k, v in build_model("retrieval", tiny_config()).state_dict().items()
             if k not in ("image_queue", "text_queue", "idx_queue")}
    path = save_with_config(tmp_path / "queues.pth", state, lambda config: config.update(queue_size=10**12))
    with raises(r"queues\.pth holds no feature queues, and its config asks for fresh ones of queue_size "
                r"1000000000000, longer than the original's 57600", within=1.0):
        load_salesforce(path)


def test_queues_held_must_match_the_config(tmp_path):
    state = build_model("retrieval", tiny_config()).state_dict()
    path = save_with_config(tmp_path / "queues.pth", state, lambda config: config.update(queue_size=10**12))
    with raises(r"(?s)image_queue: checkpoint \(32, 96\) vs model \(32, 1000000000000\).*"
                r"idx_queue: checkpoint \(1, 96\) vs model \(1, 1000000000000\)", within=1.0):
        load_salesforce(path)


@pytest.mark.parametrize("edit,match", [
    (set_vision(mlp_ratio=-1.0), r"VisionConfig\.mlp_ratio must be positive"),
    # read from the file's dict, NaN and inf are refused as they are parsed (config_from_dict), before any range check
    (set_vision(mlp_ratio=math.nan), r"vision\.mlp_ratio must be a finite number; got nan"),
    (set_text(initializer_range=math.nan), r"text\.initializer_range must be a finite number; got nan"),
    (set_text(layer_norm_eps=math.inf), r"text\.layer_norm_eps must be a finite number; got inf"),
], ids=["negative-mlp-ratio", "nan-mlp-ratio", "nan-init-std", "inf-eps"])
def test_values_no_model_can_have_are_refused(tmp_path, caption_state, edit, match):
    path = save_with_config(tmp_path / "values.pth", caption_state, edit)
    with raises(r"values\.pth carries an invalid blip_fast_config: " + match):
        load_salesforce(path)


# ------------------------------------------------------------------ sizes and values in a Hugging Face config.json


@pytest.mark.parametrize("edit,match", [
    (lambda c: c["text_config"].update(vocab_size=10**12),
     r"word_embeddings\.weight: checkpoint \(30524, 64\) vs model \(1000000000000, 64\)"),
    (lambda c: c["text_config"].update(hidden_size=65536, num_attention_heads=1024, num_hidden_layers=64,
                                       intermediate_size=262144),
     r"the config has text\.num_layers 64, but the weights hold 1 text_decoder\.bert\.encoder\.layer\.N"),
    (lambda c: c["vision_config"].update(image_size=2**20), r"visual_encoder\.pos_embed: checkpoint \(1, 5, 64\)"),
], ids=["vocab", "deep-and-wide", "image-size"])
def test_hf_sizes_are_checked_before_allocating(tmp_path, hf_caption_dir, small_address_space, edit, match):
    directory = edit_hf(hf_caption_dir, tmp_path / "hf", edit)
    with raises(match, within=1.0):
        load_hf(directory)


@pytest.mark.parametrize("edit,match", [
    (lambda c: c["vision_config"].update(intermediate_size=-128),
     r"vision_config\.intermediate_size must be an integer from 0 to 2\*\*63 - 1; got -128"),
    (lambda c: c["vision_config"].update(intermediate_size=10**400),
     r"vision_config\.intermediate_size must be an integer from 0 to 2\*\*63 - 1"),
    (lambda c: c["vision_config"].update(intermediate_size=0), r"VisionConfig\.mlp_ratio must be positive"),
    (lambda c: c["text_config"].update(initializer_range=math.nan), r"TextConfig\.initializer_range must be positive"),
    (lambda c: c["vision_config"].update(layer_norm_eps=math.nan), r"VisionConfig\.layer_norm_eps must be positive"),
    (lambda c: c["text_config"].update(hidden_dropout_prob=math.inf), r"text\.hidden_dropout must be in \[0, 1\)"),
], ids=["negative-mlp", "huge-mlp", "zero-mlp", "nan-init-std", "nan-eps", "inf-dropout"])
def test_hf_values_no_model_can_have_are_refused(tmp_path, hf_caption_dir, edit, match):
    directory = edit_hf(hf_caption_dir, tmp_path / "hf", edit)
    with raises(r"hf/config\.json: .*" + match):
        load_hf(directory)


def test_hf_integer_longer_than_python_reads(tmp_path, hf_caption_dir):
    """json.loads refuses integers of over 4300 digits with a plain ValueError, not a JSONDecodeError."""
    directory = edit_hf(hf_caption_dir, tmp_path / "hf", lambda c: None)
    text = (directory / "config.json").read_text().replace('"patch_size": 16', '"patch_size": ' + "1" * 5000)
    (directory / "config.json").write_text(text)
    with raises(r"hf/config\.json is not valid JSON: Exceeds the limit"):
        load_hf(directory)


# ------------------------------------------------------------------ file names in a Hugging Face index


def sharded(source, directory, shard_name: str, shard_file: Path | None = None) -> Path:
    """A copy of ``source`` whose weights are in a sharded safetensors index naming ``shard_name`` for all of them;
    the weights are written to ``shard_file`` (default: the file the name leads to)."""
    directory.mkdir()
    (directory / "config.json").write_bytes((source / "config.json").read_bytes())
    weights = load_file(source / "model.safetensors")
    if shard_file is not None:
        save_file(weights, shard_file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": dict.fromkeys(weights, shard_name)}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def test_hf_index_entry_outside_the_folder(tmp_path, hf_caption_dir):
    """The weights are real and readable; the index names them by a path that leaves the model folder."""
    directory = sharded(hf_caption_dir, tmp_path / "hf", "../outside.safetensors", tmp_path / "outside.safetensors")
    with raises(r"hf/model\.safetensors\.index\.json: weight_map entry '[\w.]+' names '\.\./outside\.safetensors', "
                r"a file outside .*hf"):
        load_hf(directory)


def test_hf_index_entry_with_an_absolute_path(tmp_path, hf_caption_dir):
    directory = sharded(hf_caption_dir, tmp_path / "hf", "/dev/zero")
    with raises(r"weight_map entry '[\w.]+' names '/dev/zero', a file outside"):
        load_hf(directory)


def test_hf_index_entry_through_a_linked_folder(tmp_path, hf_caption_dir):
    (tmp_path / "elsewhere").mkdir()
    directory = sharded(hf_caption_dir, tmp_path / "hf", "sub/w.safetensors", tmp_path / "elsewhere/w.safetensors")
    (directory / "sub").symlink_to(tmp_path / "elsewhere")
    with raises(r"names 'sub/w\.safetensors', a file outside"):
        load_hf(directory)


def test_hf_index_entry_linked_to_a_device(tmp_path, hf_caption_dir):
    directory = sharded(hf_caption_dir, tmp_path / "hf", "w.safetensors")
    (directory / "w.safetensors").symlink_to("/dev/zero")
    with raises(r"weight_map entry '[\w.]+' names 'w\.safetensors', which is not a file in"):
        load_hf(directory)


def test_hf_index_shards_linked_like_the_hub_cache_load(tmp_path, hf_caption_dir):
    """The Hugging Face cache links every file of ``snapshots/<commit>/`` to ``../../blobs/<hash>``."""
    (tmp_path / "blobs").mkdir()
    directory = sharded(hf_caption_dir, tmp_path / "hf", "w.safetensors", tmp_path / "blobs/0123abcd")
    (directory / "w.safetensors").symlink_to("../blobs/0123abcd")
    expected = load_hf(hf_caption_dir).state_dict()
    loaded = load_hf(directory).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


# ------------------------------------------------------------------ values


def test_nan_and_inf_weights_are_named(tmp_path, caption_state):
    state = {k: v.clone() for k, v in caption_state.items()}
    state["visual_encoder.pos_embed"][0, :3, 0] = math.nan
    state["text_decoder.bert.encoder.layer.1.output.dense.bias"][5] = -math.inf
    path = save_with_config(tmp_path / "nan.pth", state)
    with raises(r"nan\.pth holds NaN or inf values in 2 weight\(s\):\s+visual_encoder\.pos_embed: 3 NaN, 0 inf of "
                r"1088\s+text_decoder\.bert\.encoder\.layer\.1\.output\.dense\.bias: 0 NaN, 1 inf of 64"):
        load_checkpoint(path)


def test_nan_weights_in_a_hf_directory(tmp_path, hf_caption_dir):
    weights = load_file(hf_caption_dir / "model.safetensors")
    key = "vision_model.embeddings.class_embedding"
    weights[key] = torch.full_like(weights[key], math.nan)
    directory = edit_hf(hf_caption_dir, tmp_path / "hf", lambda c: None)
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    with raises(r"hf holds NaN or inf values in 1 weight\(s\):\s+visual_encoder\.cls_token: 64 NaN, 0 inf of 64"):
        load_hf(directory)


# ------------------------------------------------------------------ pickled objects


class Payload:
    """Unpickling it would need its class: ``weights_only`` refuses it."""


class CallsOnLoad:
    """Unpickling it would call ``os.getpid``: a blocked module."""

    def __reduce__(self):
        return os.getpid, ()


@pytest.mark.parametrize("payload,name", [
    (Payload(), rf"{re.escape(__name__)}\.Payload"), (CallsOnLoad(), r"(posix|nt)\.getpid"),
], ids=["class", "blocked-function"])
def test_a_refused_pickle_names_the_global_and_does_not_advise_running_it(tmp_path, caption_state, payload, name):
    torch.save({"model": dict(caption_state), "extra": payload}, tmp_path / "evil.pth")
    with raises(rf"(?s)cannot read checkpoint .*evil\.pth: it holds Python objects other than tensors and plain "
                rf"containers \(here {name}\), which blip-fast does not unpickle, for safety.*GLOBAL {name}") as info:
        load_salesforce(tmp_path / "evil.pth")
    message = str(info.value)
    assert "weights_only" not in message and "add_safe_globals" not in message and "\033" not in message
    assert "truncated" not in message
