"""The formats parse as the original reads them: BLIP JSON lists, Karpathy splits, VQA files, img2dataset tars."""

import json

import pytest
from data_helpers import encode, photo_like, write_json, write_tar

from blip_fast.data.annotations import CaptionAnnotations, RetrievalAnnotations, VqaAnnotations, load_json_list
from blip_fast.data.sample import BadSample, DataStats
from blip_fast.data.shards import TarShards, expand_shards, split_name


def test_pretraining_list_with_captions_or_lists(tmp_path):
    path = write_json(tmp_path / "pretrain.json", [
        {"image": "a.jpg", "caption": "a dog"},
        {"image": "/abs/b.jpg", "caption": ["a cat", "a cat on a mat"], "source": "cc3m"},
    ])
    source = CaptionAnnotations([path, path], image_root=tmp_path / "root")   # files are concatenated
    assert len(source) == 4
    first, second = source.sample(0, DataStats()), source.sample(1, DataStats())
    assert first.image_path == str(tmp_path / "root" / "a.jpg") and first.caption == "a dog"
    assert second.image_path == "/abs/b.jpg" and second.caption == ["a cat", "a cat on a mat"]
    assert second.extra == {"source": "cc3m", "index": 1}
    assert source.sample(3, DataStats()).key == "3"
    assert CaptionAnnotations(path).sample(0, DataStats()).image_path == "a.jpg"


def test_karpathy_train_image_ids_as_the_original(tmp_path):
    # coco_karpathy_train: img_ids[ann['image_id']] = n, numbered in order of first appearance
    entries = [{"image": f"val2014/{i}.jpg", "caption": f"caption {k}", "image_id": image_id}
               for k, (i, image_id) in enumerate([(7, "coco_7"), (7, "coco_7"), (3, "coco_3"), (7, "coco_7"),
                                                  (9, "coco_9")])]
    source = CaptionAnnotations(write_json(tmp_path / "coco_karpathy_train.json", entries), "/coco")
    samples = [source.sample(i, DataStats()) for i in range(len(source))]
    assert [s.extra["img_id"] for s in samples] == [0, 0, 1, 0, 2]
    assert [s.extra["image_id"] for s in samples] == ["coco_7", "coco_7", "coco_3", "coco_7", "coco_9"]
    assert samples[2].image_path == "/coco/val2014/3.jpg" and samples[2].caption == "caption 2"


def test_karpathy_test_text_ids_as_the_original(tmp_path):
    entries = [{"image": "x.jpg", "caption": ["a", "b", "c"]}, {"image": "y.jpg", "caption": ["d", "e"]},
               {"image": "z.jpg", "caption": "f"}]
    source = RetrievalAnnotations(write_json(tmp_path / "coco_karpathy_test.json", entries), "/root")
    # re_eval_dataset's loop, written out
    texts, img2txt, txt2img, txt_id = [], {}, {}, 0
    for img_id, ann in enumerate(entries):
        img2txt[img_id] = []
        for caption in ([ann["caption"]] if isinstance(ann["caption"], str) else ann["caption"]):
            texts.append(caption)
            img2txt[img_id].append(txt_id)
            txt2img[txt_id] = img_id
            txt_id += 1
    assert source.texts == texts
    assert source.img2txt == [img2txt[i] for i in range(3)]
    assert source.txt2img == [txt2img[t] for t in range(len(texts))]
    sample = source.sample(1, DataStats())
    assert sample.image_path == "/root/y.jpg" and sample.caption == ["d", "e"]
    assert sample.extra == {"image_index": 1, "text_ids": [3, 4]}


@pytest.mark.parametrize("bad", [[{"image": "x.jpg", "caption": ["a", 3]}], [{"image": "x.jpg"}], [{"caption": ["a"]}],
                                 ["x.jpg"], [{"image": "x.jpg", "caption": []}]])
def test_retrieval_ground_truth_is_never_altered_silently(tmp_path, bad):
    with pytest.raises(ValueError, match="entry 0"):
        RetrievalAnnotations(write_json(tmp_path / "test.json", bad))


def test_vqa_answers_weights_and_roots(tmp_path):
    entries = [
        {"question_id": 11, "question": "What color?", "answer": ["red", "red", "blue", "red"], "image": "a.jpg",
         "dataset": "vqa"},
        {"question_id": 12, "question": "How many?", "answer": "two", "image": "b.jpg", "dataset": "vg"},
        {"question_id": 13, "question": "Is it?", "image": "c.jpg", "dataset": "vqa"},        # test split
    ]
    source = VqaAnnotations(write_json(tmp_path / "vqa.json", entries), {"vqa": "/coco", "vg": "/vg"})
    vqa, vg, test = (source.sample(i, DataStats()) for i in range(3))
    assert vqa.key == "11" and vqa.image_path == "/coco/a.jpg" and vqa.caption is None
    # vqa_dataset: weight of an answer = its count / number of answers
    assert vqa.extra["answers"] == ["red", "blue"] and vqa.extra["weights"] == pytest.approx([0.75, 0.25])
    assert vqa.extra["question"] == "What color?" and vqa.extra["question_id"] == 11
    assert vg.image_path == "/vg/b.jpg" and vg.extra["answers"] == ["two"] and vg.extra["weights"] == [0.2]
    assert "answers" not in test.extra and test.extra["dataset"] == "vqa"
    with pytest.raises(ValueError, match="vg"):
        VqaAnnotations(write_json(tmp_path / "vqa2.json", entries), {"vqa": "/coco"})
    assert VqaAnnotations(tmp_path / "vqa.json", "/one").sample(1, DataStats()).image_path == "/one/b.jpg"


def test_vqa_bad_entries(tmp_path):
    entries = [{"question_id": 1, "question": "", "answer": ["x"], "image": "a.jpg"},
               {"question_id": 2, "question": "Why?", "answer": ["", None], "image": "a.jpg"},
               {"question_id": 3, "question": "Why?", "answer": ["yes"], "image": "a.jpg", "dataset": ["vqa"]},
               {"question_id": 4, "question": "Why?", "answer": ["yes", 5], "image": "a.jpg"}]
    source = VqaAnnotations(write_json(tmp_path / "v.json", entries), {"vqa": "/r"})
    reasons = []
    for i in range(3):
        with pytest.raises(BadSample) as info:
            source.sample(i, DataStats())
        reasons.append(info.value.reason)
    assert reasons == ["no_question", "no_answer", "bad_record"]
    stats = DataStats()
    assert source.sample(3, stats).extra["answers"] == ["yes"] and stats.fixed == {"answer_entries_dropped": 1}


def test_annotation_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_json_list(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_json_list(tmp_path / "bad.json")
    write_json(tmp_path / "dict.json", {"image": "a.jpg"})
    with pytest.raises(ValueError, match="JSON list"):
        CaptionAnnotations(tmp_path / "dict.json")


def test_img2dataset_tar_layout(tmp_path):
    jpg, png = encode(photo_like(16, 16), "JPEG"), encode(photo_like(16, 16, seed=2), "PNG")
    meta = {"caption": "from json", "url": "http://x/1.jpg", "key": "000000001", "status": "success",
            "width": 16, "height": 16}
    path = write_tar(tmp_path / "00000.tar", [
        ("00000/000000001.jpg", jpg), ("00000/000000001.txt", b"from txt"),
        ("00000/000000001.json", json.dumps(meta).encode()),
        ("00000/000000002.json", json.dumps({"caption": "only json"}).encode()), ("00000/000000002.png", png),
        ("00000/000000003.jpg", jpg), ("00000/000000003.txt", "caf\u00e9 au lait".encode()),
        ("00000/000000003.cls", b"7"),
    ])
    source = TarShards(str(path))
    records = list(source.read(source.shards[0]))
    samples = [source.sample(record, DataStats()) for record in records]
    assert [s.key for s in samples] == ["00000/000000001", "00000/000000002", "00000/000000003"]
    assert [s.caption for s in samples] == ["from txt", "only json", "caf\u00e9 au lait"]    # .txt wins over .json
    assert samples[0].image_bytes == jpg and samples[1].image_bytes == png
    assert samples[0].extra == {"shard": str(path), "meta": meta}
    assert samples[2].extra["files"] == {"cls": b"7"}


def test_split_name_and_shard_specs(tmp_path):
    assert split_name("00000/000000012.jpg") == ("00000/000000012", "jpg")
    assert split_name("a/b.c/key.seg.JSON") == ("a/b.c/key", "seg.json")
    assert split_name("README") == ("README", "")
    for i in range(3):
        (tmp_path / f"part-{i:03d}.tar").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    names = [str(tmp_path / f"part-{i:03d}.tar") for i in range(3)]
    assert expand_shards(tmp_path) == names
    assert expand_shards(str(tmp_path / "part-*.tar")) == names
    assert expand_shards(str(tmp_path / "part-{000..002}.tar")) == names
    assert expand_shards(str(tmp_path / "x-{8..10}.tar")) == [str(tmp_path / f"x-{i}.tar") for i in (8, 9, 10)]
    assert expand_shards([names[2], names[0]]) == [names[2], names[0]]
    with pytest.raises(ValueError, match="no shards"):
        TarShards(str(tmp_path / "none-*.tar"))
