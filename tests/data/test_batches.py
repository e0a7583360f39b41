"""CaptionBatches: sources -> image transforms -> tokenized batches, on PIL and on DALI (CPU here).

What is checked: dynamic padding (each batch as long as its longest caption, the tokens those of
the cleaned caption); the choice among a sample's captions (deterministic, different across
epochs, the same whatever the worker count); bad samples skipped and counted alike on both
backends; JSON lists and shards giving the same pairs; DALI's evaluation images within the
tolerance of test_dali_pipeline.py of PIL's, in the same order with the same captions; exact
resuming (PIL bit for bit, with workers and across an epoch boundary; DALI with its random
augmentation, through its pipeline checkpoint); disjoint ranks; clear errors for user mistakes.
"""

import json
import logging
import subprocess
import sys

import pytest
import torch
from data_helpers import encode, photo_like, write_json

from blip_fast.data import batches as batches_module
from blip_fast.data.annotations import RetrievalAnnotations, VqaAnnotations
from blip_fast.data.batches import CaptionBatch, CaptionBatches, open_caption_source
from blip_fast.data.dali_pipeline import HAS_DALI, DaliOptions
from blip_fast.data.synth import write_synthetic_dataset
from blip_fast.data.transforms import STD, TransformConfig
from blip_fast.text.clean import clean_caption
from blip_fast.text.tokenizer import BlipTokenizer

needs_dali = pytest.mark.skipif(not HAS_DALI, reason="nvidia.dali is not importable (pip install nvidia-dali-cuda130)")
LEVEL = 1.0 / (255.0 * min(STD))          # one pixel level in normalised units, as in test_dali_pipeline.py
EVAL = TransformConfig.eval(32)
# RandomAugment with a short op list: the same random operators and conditionals, a quicker DALI build
TRAIN = TransformConfig.pretrain(32, augment_ops=("Identity", "Rotate", "AutoContrast", "Equalize"))


def cpu_dali():
    return DaliOptions(device="cpu", num_threads=1)


@pytest.fixture(scope="module")
def synth64(tmp_path_factory):
    """40 scenes of 64 px: 36 train (shards of 6) with one caption each, 2 val, 2 test."""
    out = tmp_path_factory.mktemp("synth64")
    write_synthetic_dataset(out, 40, image_size=64, seed=3, shard_size=6)
    return out


@pytest.fixture(scope="module")
def train_json(synth64):
    return open_caption_source("json", synth64 / "train.json", synth64)


@pytest.fixture(scope="module")
def list_captions(synth64):
    """The training images with five numbered captions each (``pretrain_dataset``'s list form)."""
    entries = json.loads((synth64 / "train.json").read_text())
    for entry in entries:
        entry["caption"] = [f"{entry['caption']}, take {k}" for k in range(5)]
    return open_caption_source("json", write_json(synth64 / "lists.json", entries), synth64)


@pytest.fixture(scope="module")
def bad_data(synth64, tmp_path_factory):
    """Twelve good training entries and one of each kind of trouble, named by its caption."""
    root = tmp_path_factory.mktemp("bad")
    entries = json.loads((synth64 / "train.json").read_text())[:12]
    for entry in entries:
        entry["image"] = str(synth64 / entry["image"])
    jpeg = encode(photo_like(48, 40, seed=1), quality=90)
    files = {"truncated.jpg": jpeg[:len(jpeg) // 2], "no_end_marker.jpg": jpeg[:-2],
             "png.png": encode(photo_like(48, 40, seed=2), "PNG"), "gif.gif": encode(photo_like(48, 40, seed=3), "GIF")}
    for name, data in files.items():
        (root / name).write_bytes(data)
    entries += [{"image": str(root / name), "caption": name.split(".")[0].replace("_", " ")} for name in files]
    entries += [{"image": str(root / "missing.jpg"), "caption": "missing"},
                {"image": entries[0]["image"], "caption": "..."},
                {"image": entries[0]["image"], "caption": ["", "!!"]}]
    return open_caption_source("json", write_json(root / "bad.json", entries))


def epoch_of(batches: CaptionBatches) -> list[CaptionBatch]:
    return list(batches)


def captions(batch: CaptionBatch, tokenizer: BlipTokenizer) -> list[str]:
    return tokenizer.batch_decode(batch.input_ids)


def take(batches: CaptionBatches, n: int) -> list[CaptionBatch]:
    """The first ``n`` batches over successive epochs, stopping in the middle of one."""
    out = []
    while len(out) < n:
        for batch in batches:
            out.append(batch)
            if len(out) == n:
                break
    return out


def until_epoch(batches: CaptionBatches, epoch: int) -> list[CaptionBatch]:
    out = []
    while batches.epoch < epoch:
        out += list(batches)
    return out


def assert_same(got: list[CaptionBatch], want: list[CaptionBatch]):
    assert [b.keys for b in got] == [b.keys for b in want]
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
        assert torch.equal(a.images, b.images), f"images differ in batch {a.keys}"


# ---------------------------------------------------------------------------------------------
# Batches and captions
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_length", [30, 8])
def test_dynamic_padding_and_tokens(train_json, synth64, max_length):
    tokenizer = BlipTokenizer()
    raw = {str(i): e["caption"] for i, e in enumerate(json.loads((synth64 / "train.json").read_text()))}
    got = epoch_of(CaptionBatches(train_json, TransformConfig.eval(32, dtype="bfloat16"), 5, max_length=max_length,
                                  seed=1))
    assert len(got) == 36 // 5                                  # drop_last: the partial batch is dropped
    lengths = set()
    for batch in got:
        assert len(batch) == 5 and batch.images.shape == (5, 3, 32, 32) and batch.images.dtype == torch.bfloat16
        assert batch.input_ids.dtype == batch.attention_mask.dtype == torch.long
        real = batch.attention_mask.sum(1)
        assert batch.input_ids.shape[1] == real.max() <= max_length   # as long as the batch's longest caption
        assert torch.equal(batch.attention_mask, (batch.input_ids != 0).long())   # no hole inside a row
        assert (batch.input_ids[:, 0] == tokenizer.cls_token_id).all()
        assert (batch.input_ids[torch.arange(5), real - 1] == tokenizer.sep_token_id).all()
        for key, row, n in zip(batch.keys, batch.input_ids, real, strict=True):
            alone = tokenizer([clean_caption(raw[key], 30)], max_length=max_length).input_ids[0]
            assert row[:n].tolist() == alone.tolist()        # the cleaned caption, truncated at max_length
        assert batch.img_ids is not None and batch.img_ids.tolist() == [int(k) for k in batch.keys]
        lengths.add(batch.input_ids.shape[1])
    if max_length == 30:
        assert len(lengths) > 1, "every batch has the same length: padding is not per batch"
    else:
        assert lengths == {max_length}                            # every synthetic caption is longer
    moved = got[0].to("cpu", non_blocking=True)
    assert torch.equal(moved.images, got[0].images) and moved.keys == got[0].keys


def test_caption_choice_is_deterministic_and_varies_by_epoch(list_captions):
    tokenizer = BlipTokenizer()

    def chosen(batches, epochs):
        per_epoch = []
        for _ in range(epochs):
            per_epoch.append({key: text for batch in batches
                              for key, text in zip(batch.keys, captions(batch, tokenizer), strict=True)})
        return per_epoch

    settings = {"batch_size": 4, "seed": 2, "drop_last": False}
    first = chosen(CaptionBatches(list_captions, EVAL, **settings), 3)
    again = chosen(CaptionBatches(list_captions, EVAL, **settings), 1)
    workers = chosen(CaptionBatches(list_captions, EVAL, num_workers=2, **settings), 1)
    assert first[0] == again[0] == workers[0]              # a function of (seed, epoch, key) only
    assert all(len(epoch) == 36 for epoch in first)
    assert all(text.split(" take ")[1] in "01234" for text in first[0].values())
    changed = sum(first[0][key] != first[1][key] for key in first[0])
    assert changed > 36 // 2, "the caption choice hardly changes between epochs"
    other_seed = chosen(CaptionBatches(list_captions, EVAL, **{**settings, "seed": 3}), 1)
    assert other_seed[0] != first[0]


def test_epochs_follow_each_other_and_set_epoch_jumps(train_json):
    reference = CaptionBatches(train_json, EVAL, 6, seed=3)
    passes = [[b.keys for b in reference] for _ in range(3)]
    assert reference.epoch == 3 and passes[0] != passes[1] != passes[2]
    assert reference.stats.samples == 3 * 36
    jumped = CaptionBatches(train_json, EVAL, 6, seed=3)
    jumped.set_epoch(2)
    assert [b.keys for b in jumped] == passes[2] and jumped.epoch == 3


# ---------------------------------------------------------------------------------------------
# Bad samples, sources, ranks
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["pil", pytest.param("dali", marks=needs_dali)])
def test_bad_samples_are_skipped_and_counted(bad_data, backend):
    tokenizer = BlipTokenizer()
    batches = CaptionBatches(bad_data, EVAL, 4, backend=backend, dali=cpu_dali(), drop_last=False)
    got = epoch_of(batches)
    texts = [text for batch in got for text in captions(batch, tokenizer)]
    assert len(texts) == 12 + 3                                   # the good ones, the repaired JPEG, PNG, GIF
    assert {"no end marker", "png", "gif"} <= set(texts) and not {"truncated", "missing"} & set(texts)
    stats = batches.stats
    assert stats.samples == 15
    assert dict(stats.skipped) == {"corrupt_image": 1, "missing_image": 1, "no_caption": 2}
    assert stats.fixed["jpeg_end_marker_missing"] == 1 and stats.fixed["converted_P_to_RGB"] == 1
    if backend == "dali":                                         # DALI gets only what it decodes without stopping
        assert stats.fixed["reencoded_PNG_for_dali"] == stats.fixed["reencoded_GIF_for_dali"] == 1


@pytest.mark.parametrize("backend", ["pil", pytest.param("dali", marks=needs_dali)])
def test_a_jpeg_of_a_frame_kind_no_decoder_takes_is_skipped(tmp_path, backend):
    """A lossless-frame JPEG (SOF3), whole and with its end marker, which PIL reads the header of but cannot decode:
    PIL skips it as corrupt; DALI's decoders would stop the pipeline, so such frames go to PIL first (and are skipped
    there the same way)."""
    entries = []
    for k in range(4):
        data = encode(photo_like(32, 32, seed=k), "JPEG")
        if k == 2:
            data = data.replace(b"\xff\xc0", b"\xff\xc3", 1)
        (tmp_path / f"{k}.jpg").write_bytes(data)
        entries.append({"image": f"{k}.jpg", "caption": f"picture {k}"})
    source = open_caption_source("json", [write_json(tmp_path / "a.json", entries)], tmp_path)
    batches = CaptionBatches(source, EVAL, 2, backend=backend, dali=cpu_dali(), drop_last=False)
    texts = [text for batch in epoch_of(batches) for text in captions(batch, BlipTokenizer())]
    assert sorted(texts) == ["picture 0", "picture 1", "picture 3"]
    assert dict(batches.stats.skipped) == {"corrupt_image": 1}


def test_a_caption_list_with_nothing_left_after_cleaning_is_skipped(synth64, tmp_path):
    entries = json.loads((synth64 / "val.json").read_text())        # Karpathy evaluation shape: caption lists
    entries[0]["caption"] = ["...", "!!"]
    entries[1]["caption"] = ["...", "A dog."]
    source = RetrievalAnnotations(write_json(tmp_path / "val.json", entries), synth64)
    batches = CaptionBatches(source, EVAL, 4, drop_last=False)
    (batch,) = epoch_of(batches)
    assert captions(batch, BlipTokenizer()) == ["a dog"] and batch.keys == ["1"] and batch.img_ids is None
    assert dict(batches.stats.skipped) == {"no_caption": 1}


def test_json_lists_and_shards_give_the_same_pairs(synth64, train_json):
    tokenizer = BlipTokenizer()
    shards = open_caption_source("shards", synth64 / "shards" / "train-*.tar")
    image_ids = [e["image_id"] for e in json.loads((synth64 / "train.json").read_text())]

    def pairs(source, name):
        got = epoch_of(CaptionBatches(source, EVAL, 4, drop_last=False, shuffle_buffer=5))
        assert sum(map(len, got)) == 36
        return {name(key): (text, image) for batch in got
                for key, text, image in zip(batch.keys, captions(batch, tokenizer), batch.images, strict=True)}

    from_json = pairs(train_json, lambda key: image_ids[int(key)])
    from_shards = pairs(shards, str)
    assert from_json.keys() == from_shards.keys()
    for key, (text, image) in from_json.items():
        assert text == from_shards[key][0] and torch.equal(image, from_shards[key][1])


def test_ranks_split_the_data_disjointly(train_json):
    keys = []
    for rank in range(3):
        got = epoch_of(CaptionBatches(train_json, EVAL, 5, rank=rank, world_size=3, drop_last=False, seed=4))
        keys.append({key for batch in got for key in batch.keys})
    assert all(len(k) == 12 for k in keys)
    assert keys[0] | keys[1] | keys[2] == {str(i) for i in range(36)}
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])


# ---------------------------------------------------------------------------------------------
# PIL against DALI
# ---------------------------------------------------------------------------------------------

@needs_dali
def test_dali_eval_matches_pil(tmp_path):
    entries = []
    for i in range(10):                       # photo-like JPEGs: test_dali_pipeline.py's tolerance is for photos
        width, height = [(96, 72), (80, 100), (120, 90)][i % 3]
        (tmp_path / f"{i}.jpg").write_bytes(encode(photo_like(width, height, seed=i), quality=90))
        entries.append({"image": f"{i}.jpg", "caption": [f"photo {i}", f"picture {i}", f"image {i}"], "image_id": i})
    source = open_caption_source("json", write_json(tmp_path / "photos.json", entries), tmp_path)
    config = TransformConfig.eval(64)
    pil = CaptionBatches(source, config, 4, seed=5)
    dali = CaptionBatches(source, config, 4, seed=5, backend="dali", dali=cpu_dali())
    assert (pil.backend, dali.backend) == ("pil", "dali_cpu")
    got_pil, got_dali = epoch_of(pil), epoch_of(dali)
    assert len(got_pil) == len(got_dali) == 2
    for a, b in zip(got_pil, got_dali, strict=True):
        assert a.keys == b.keys and torch.equal(a.input_ids, b.input_ids) and torch.equal(a.img_ids, b.img_ids)
        assert a.images.shape == b.images.shape == (4, 3, 64, 64) and a.images.dtype == b.images.dtype
        diff = (a.images - b.images).abs()
        assert diff.max() <= 3 * LEVEL and diff.mean() <= 0.5 * LEVEL, (diff.max() / LEVEL, diff.mean() / LEVEL)
    assert pil.epoch == dali.epoch == 1


# ---------------------------------------------------------------------------------------------
# Resuming
# ---------------------------------------------------------------------------------------------

def check_resume(make, cuts):
    """``make()`` resumed after each of ``cuts`` batches gives exactly the rest of the first two epochs."""
    reference = make()
    full = until_epoch(reference, 2)
    for cut in cuts(full):
        first = make()
        head = take(first, cut)
        state = json.loads(json.dumps(first.state_dict()))         # a checkpoint holds it as JSON
        resumed = make()
        resumed.load_state_dict(state)
        assert resumed.epoch == first.epoch and resumed.stats.to_dict() == first.stats.to_dict()
        assert_same(head + until_epoch(resumed, 2), full)
    return full


def test_resume_pil_is_exact_with_workers_and_across_epochs(train_json):
    def make(workers=2):
        return CaptionBatches(train_json, TRAIN, 4, num_workers=workers, seed=7)

    full = check_resume(make, lambda full: [3, len(full) // 2, len(full) // 2 + 2])
    # a sample gets the same crop whatever the worker count (seeded by seed, epoch and key)
    alone = {key: image for batch in epoch_of(make(workers=0))
             for key, image in zip(batch.keys, batch.images, strict=True)}
    epochs = [{key: image for batch in half for key, image in zip(batch.keys, batch.images, strict=True)}
              for half in (full[:len(full) // 2], full[len(full) // 2:])]
    assert all(torch.equal(image, alone[key]) for key, image in epochs[0].items())
    both = epochs[0].keys() & epochs[1].keys()
    assert sum(not torch.equal(epochs[0][key], epochs[1][key]) for key in both) == len(both)   # new crops each epoch


def test_read_ahead_starts_each_batch_before_the_one_before_is_handed_out_and_resumes_exactly(train_json):
    """The trainer's GPU copies (``read_ahead``): batch i + 1 is read and started before batch i is handed out, the
    batches are those read without it, and the state stays that of the batches handed out: the same object and one
    resumed from its state both continue with the batch that had been read ahead."""
    def make():
        batches = CaptionBatches(train_json, TRAIN, 4, seed=7)
        batches.read_ahead(lambda batch: events.append(("start", batch.keys[0])) or batch)
        return batches

    events = []
    reference = epoch_of(CaptionBatches(train_json, TRAIN, 4, seed=7))
    batches, handed = make(), []
    for batch in batches:
        events.append(("hand out", batch.keys[0]))
        handed.append(batch)
        if len(handed) == 3:
            break
    first = [b.keys[0] for b in reference[:4]]
    assert events == [("start", first[0]), ("start", first[1]), ("hand out", first[0]), ("start", first[2]),
                      ("hand out", first[1]), ("start", first[3]), ("hand out", first[2])]
    assert_same(handed, reference[:3])
    state = json.loads(json.dumps(batches.state_dict()))
    assert state["loader"]["samples"] == 12                         # three batches handed out, not the fourth read
    assert_same(epoch_of(batches), reference[3:])                   # the same object: batch 3 again, then the rest
    resumed = make()
    resumed.load_state_dict(state)
    assert_same(epoch_of(resumed), reference[3:])
    assert_same(epoch_of(make()), reference)                        # a whole epoch, its last batch included


@needs_dali
def test_resume_dali_is_exact_with_random_augmentation(train_json):
    def make():
        return CaptionBatches(train_json, TRAIN, 4, backend="dali", dali=cpu_dali(), seed=7)

    full = check_resume(make, lambda full: [2, len(full) // 2])
    # the same samples as the PIL backend, in the same order
    pil = until_epoch(CaptionBatches(train_json, TRAIN, 4, seed=7), 2)
    assert [b.keys for b in pil] == [b.keys for b in full]


@needs_dali
def test_a_state_loaded_over_an_unfinished_dali_pass_resumes_from_that_state(train_json):
    """Loading a state must not keep the pipeline of a pass left open before: its random state is another's."""
    config = TransformConfig.pretrain(32)                           # the full RandomAugment graph
    reference = epoch_of(CaptionBatches(train_json, config, 4, backend="dali", dali=cpu_dali()))
    source = CaptionBatches(train_json, config, 4, backend="dali", dali=cpu_dali())
    take(source, 3)
    state = json.loads(json.dumps(source.state_dict()))
    batches = CaptionBatches(train_json, config, 4, backend="dali", dali=cpu_dali())
    for _ in batches:
        break                                                       # a pass left open, one batch in
    batches.load_state_dict(state)
    assert_same(epoch_of(batches), reference[3:])


@needs_dali
def test_dali_state_of_a_dropped_iterator_is_its_last_batch(train_json):
    """DALI reads batches ahead; the state (and a new pass) follows the batches handed out, not those read."""
    config = TransformConfig.pretrain(32)                           # the full RandomAugment graph
    reference = epoch_of(CaptionBatches(train_json, config, 4, backend="dali", dali=cpu_dali()))
    batches = CaptionBatches(train_json, config, 4, backend="dali", dali=cpu_dali())
    for i, _ in enumerate(batches):
        if i == 1:
            break                                                   # the iterator is dropped here
    state = batches.state_dict()
    assert state["loader"]["samples"] == 8
    assert_same(epoch_of(batches), reference[2:])                   # the same object continues exactly
    resumed = CaptionBatches(train_json, config, 4, backend="dali", dali=cpu_dali())
    resumed.load_state_dict(state)
    assert_same(epoch_of(resumed), reference[2:])


@needs_dali
def test_a_state_from_the_other_backend_resumes_the_same_samples(train_json, caplog):
    dali = CaptionBatches(train_json, TRAIN, 4, backend="dali", dali=cpu_dali(), seed=1)
    take(dali, 2)
    pil = CaptionBatches(train_json, TRAIN, 4, seed=1)
    with caplog.at_level(logging.WARNING, logger="blip_fast.data"):
        pil.load_state_dict(dali.state_dict())
    assert "fresh random crops" in caplog.text
    reference = epoch_of(CaptionBatches(train_json, TRAIN, 4, seed=1))
    assert [b.keys for b in epoch_of(pil)] == [b.keys for b in reference[2:]]


# ---------------------------------------------------------------------------------------------
# User mistakes
# ---------------------------------------------------------------------------------------------

def test_user_mistakes_are_clear_errors(synth64, train_json, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="kind must be one of"):
        open_caption_source("parquet", synth64 / "train.json")
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        open_caption_source("json", tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="shard files"):
        open_caption_source("shards", [tmp_path / "a.tar", tmp_path / "b.tar"])
    with pytest.raises(ValueError, match="image_root applies to JSON"):
        open_caption_source("shards", synth64 / "shards", image_root=synth64)
    with pytest.raises(ValueError, match="batch_size"):
        CaptionBatches(train_json, EVAL, 0)
    with pytest.raises(ValueError, match="backend must be one of"):
        CaptionBatches(train_json, EVAL, 4, backend="opencv")
    with pytest.raises(ValueError, match="max_length"):
        CaptionBatches(train_json, EVAL, 4, max_length=1)
    with pytest.raises(ValueError, match="encoded"):
        CaptionBatches(train_json, EVAL, 4, dali=DaliOptions(inputs="pixels"))
    vqa = VqaAnnotations(write_json(tmp_path / "vqa.json", [{"question_id": 1, "question": "what?", "image": "x.jpg"}]))
    with pytest.raises(ValueError, match="questions, not captions"):
        CaptionBatches(vqa, EVAL, 4)
    with pytest.raises(ValueError, match="not a CaptionBatches state"):
        CaptionBatches(train_json, EVAL, 4).load_state_dict({"epoch": 3})
    with pytest.raises(ValueError, match="batch_size"):           # the loader refuses other settings
        CaptionBatches(train_json, EVAL, 5).load_state_dict(CaptionBatches(train_json, EVAL, 4).state_dict())
    monkeypatch.setattr(batches_module, "HAS_DALI", False)
    with pytest.raises(ValueError, match="DALI, which is not installed"):
        CaptionBatches(train_json, EVAL, 4, backend="dali")
    assert CaptionBatches(train_json, EVAL, 4, backend="auto").backend == "pil"


def test_the_trainer_imports_without_dali():
    """DALI is optional: with it missing, the data and training modules import and ``auto`` means PIL (a GPU
    machine without DALI once failed here on a name that only exists when DALI is installed)."""
    code = ("import sys; sys.modules['nvidia.dali'] = None\n"
            "import blip_fast.train\n"
            "from blip_fast.data import batches\n"
            "from blip_fast.data.dali_pipeline import DaliOptions\n"
            "assert not batches.HAS_DALI\n"
            "print(batches._resolve_backend('auto', DaliOptions()))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "pil"


def test_batches_pin_their_host_tensors_for_a_gpu(train_json, monkeypatch):
    """With ``pin_memory`` (the trainers ask for it on a GPU) the loader pins each batch through
    ``CaptionBatch.pin_memory``, which pins every host tensor and leaves a device's (DALI's GPU images) alone. Without
    a GPU the DataLoader pins nothing, so pinning is recorded here instead of done."""
    pinned = []

    def pin(tensor):
        pinned.append(tensor.shape)
        return tensor.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    batches = CaptionBatches(train_json, EVAL, 4, pin_memory=True)
    assert batches._loader._loader_options["pin_memory"] is True
    assert CaptionBatches(train_json, EVAL, 4)._loader._loader_options["pin_memory"] is False
    batch = next(iter(batches))
    again = batch.pin_memory()
    assert isinstance(again, CaptionBatch) and again.keys == batch.keys
    assert batch.img_ids is not None  # the synthetic list numbers its images
    assert pinned == [batch.images.shape, batch.input_ids.shape, batch.attention_mask.shape, batch.img_ids.shape]
    for name in ("images", "input_ids", "attention_mask"):
        assert torch.equal(getattr(again, name), getattr(batch, name))
    pinned.clear()
    on_device = CaptionBatch(torch.zeros(2, 3, 4, 4, device="meta"), batch.input_ids[:2], batch.attention_mask[:2],
                             batch.keys[:2], torch.arange(2))
    on_device.pin_memory()
    assert pinned == [batch.input_ids[:2].shape, batch.attention_mask[:2].shape, (2,)]


@pytest.mark.gpu
def test_batches_come_pinned_where_a_gpu_is(train_json):
    batch = next(iter(CaptionBatches(train_json, EVAL, 4, pin_memory=True)))
    assert batch.images.is_pinned() and batch.input_ids.is_pinned() and batch.attention_mask.is_pinned()
