"""NoCaps evaluation: per-domain scores against the COCO caption metrics of each domain's images alone, the
annotation and reference files' refusals, the submission file's exact format, and ``blip-fast eval nocaps`` end to
end on a tiny random captioning checkpoint and synthetic images.

The metrics run without Java (``java=False``) except where Java's tools are stubbed (as in test_caption_metrics.py):
the Java path of the metrics themselves is tested there."""

import json
import random
import re

import pytest
import torch

from blip_fast.checkpoint import save_salesforce
from blip_fast.cli import main
from blip_fast.config import preset
from blip_fast.data.synthetic import sample
from blip_fast.evaluation import caption_metrics as metrics_module
from blip_fast.evaluation.caption_metrics import basic_tokenize, caption_metrics
from blip_fast.evaluation.captioning import EVAL_GENERATION, caption_images
from blip_fast.evaluation.nocaps import (
    NOCAPS_GENERATION,
    NocapsImage,
    NocapsResult,
    evaluate_nocaps,
    nocaps_metrics,
    read_nocaps_images,
    read_nocaps_references,
    write_nocaps_submission,
)
from blip_fast.models import build_model

IMAGE_SIZE = 32
DOMAINS = ("in-domain", "near-domain", "out-domain")

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# Two images a domain (ids as NoCaps numbers them, not in domain order), references sharing words across domains so
# that a domain's document frequencies differ from the entire split's
IMAGES = [(4, "in-domain"), (0, "near-domain"), (7, "out-domain"), (2, "in-domain"), (9, "near-domain"),
          (5, "out-domain")]
REFERENCES = {
    4: ["a dog runs on the grass", "a brown dog running in a park"],
    0: ["a red car parked on a street", "a car on the road"],
    7: ["a jellyfish floating in blue water", "a jellyfish in the sea"],
    2: ["a dog sleeps on a sofa", "a cat and a dog on a couch"],
    9: ["a bus driving down a street", "a red bus on the road"],
    5: ["an accordion on a wooden table", "a man playing an accordion"],
}
CAPTIONS = {4: "a dog running on grass", 0: "a red car on the street", 7: "a jellyfish in the water",
            2: "a dog on a couch", 9: "a red bus on a street", 5: "a man with an accordion"}


def coco_references(images=IMAGES, references=REFERENCES) -> dict:
    """The COCO caption format of nocaps_val_4500_captions.json, with the fields the server's file also has."""
    return {"licenses": [], "info": {"version": "0.1"},
            "images": [{"id": image_id, "file_name": f"{image_id:016x}.jpg", "open_images_id": f"{image_id:016x}",
                        "height": 32, "width": 32, "domain": domain} for image_id, domain in images],
            "annotations": [{"image_id": image_id, "id": 10 * image_id + k, "caption": caption}
                            for image_id, captions in references.items() for k, caption in enumerate(captions)]}


@pytest.fixture
def references_file(tmp_path):
    path = tmp_path / "nocaps_val_4500_captions.json"
    path.write_text(json.dumps(coco_references()))
    return path


def test_each_domain_is_scored_as_a_corpus_of_its_own(references_file):
    references = read_nocaps_references(references_file)
    assert references.captions == REFERENCES and references.domains == dict(IMAGES)
    metrics, notices = nocaps_metrics(references, CAPTIONS, java=False)
    assert list(metrics) == [*DOMAINS, "entire"]
    for domain in DOMAINS:
        ids = [image_id for image_id, d in IMAGES if d == domain]
        alone = caption_metrics({i: REFERENCES[i] for i in ids}, {i: CAPTIONS[i] for i in ids}, java=False)
        assert metrics[domain] == alone.scores, domain
    entire = caption_metrics(REFERENCES, CAPTIONS, java=False)
    assert metrics["entire"] == entire.scores
    assert notices == entire.notices
    # the fixture is one where it matters: CIDEr's document frequencies of a domain are not the entire split's
    mean_of_domains = sum(metrics[domain]["CIDEr"] for domain in DOMAINS) / 3
    assert mean_of_domains != pytest.approx(metrics["entire"]["CIDEr"], rel=1e-3)

    result = NocapsResult(6, metrics, notices, CAPTIONS)
    assert result.score == metrics["entire"]["CIDEr"]
    shown = result.summary()
    assert shown.startswith("NoCaps on 6 images: in-domain CIDEr ")
    assert f"entire CIDEr {metrics['entire']['CIDEr']:.3f}, Bleu_4 {metrics['entire']['Bleu_4']:.3f}" in shown
    assert "METEOR skipped" in shown


def test_a_partial_split_scores_the_domains_it_has_and_says_so(references_file):
    references = read_nocaps_references(references_file)
    metrics, notices = nocaps_metrics(references, {4: CAPTIONS[4], 2: CAPTIONS[2], 7: CAPTIONS[7]}, java=False)
    assert list(metrics) == ["in-domain", "out-domain", "entire"]
    assert metrics["entire"] == caption_metrics({i: REFERENCES[i] for i in (4, 2, 7)},
                                                {i: CAPTIONS[i] for i in (4, 2, 7)}, java=False).scores
    assert notices[0] == "no near-domain images"
    assert notices[-1] == "3 of the references' 6 images scored: not the server's numbers"


def test_with_java_every_metric_of_the_wrapper_is_reported_per_domain(references_file, monkeypatch):
    # Java's tools stubbed as in test_caption_metrics.py: Python tokens, METEOR 0.5, SPICE 0.25 on every domain
    class FakeSpice:
        def compute_score(self, gts, res):
            return 0.25, []

    monkeypatch.setattr(metrics_module.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(metrics_module, "_ptb_tokenize", lambda refs, preds: (
        {i: [basic_tokenize(c) for c in refs[i]] for i in refs}, {i: [basic_tokenize(preds[i])] for i in refs}))
    monkeypatch.setattr(metrics_module, "_meteor", lambda gts, res: 0.5)
    monkeypatch.setattr(metrics_module, "missing_spice_models", lambda: [])
    monkeypatch.setattr(metrics_module, "Spice", FakeSpice)
    metrics, notices = nocaps_metrics(read_nocaps_references(references_file), CAPTIONS)
    names = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"]
    assert {domain: list(scores) for domain, scores in metrics.items()} == {d: names for d in (*DOMAINS, "entire")}
    assert notices == []
    summary = NocapsResult(6, metrics, notices, CAPTIONS).summary()
    assert summary.endswith(f"entire CIDEr {metrics['entire']['CIDEr']:.3f}, SPICE 0.250, Bleu_4 "
                            f"{metrics['entire']['Bleu_4']:.3f}, METEOR 0.500")


def test_without_java_scoring_is_refused_before_captioning(references_file, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without java

    class NeverCaptions(torch.nn.Module):
        def captions(self, *args):
            raise AssertionError("captioned before finding that the scoring cannot run")

    with pytest.raises(ValueError, match="need Java.*--no-java"):
        evaluate_nocaps(NeverCaptions(), [NocapsImage(4, "a.jpg")], IMAGE_SIZE,
                        read_nocaps_references(references_file))


@pytest.mark.parametrize("entries, message", [
    ({"image": "a.jpg", "img_id": 1}, "expected a JSON list"),
    ([], "no images to caption"),
    (["a.jpg"], "entry 0 is str, not an object"),
    ([{"img_id": 1}], "entry 0 has no image path"),
    ([{"image": "a.jpg"}], "entry 0: img_id must be an integer .* got None"),
    ([{"image": "a.jpg", "img_id": True}], "img_id must be an integer"),
    ([{"image": "a.jpg", "img_id": 1.0}], "img_id must be an integer"),
    ([{"image": "a.jpg", "img_id": 3}, {"image": "b.jpg", "img_id": "3"}], "img_id 3 is given twice \\(entries 0 "
                                                                            "and 1\\)"),
])
def test_malformed_annotations_are_refused(tmp_path, entries, message):
    path = tmp_path / "nocaps_val.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=message):
        read_nocaps_images(path)


def test_annotations_are_read_in_order_under_the_image_root(tmp_path):
    path = tmp_path / "nocaps_val.json"
    path.write_text(json.dumps([{"image": "val/b.jpg", "img_id": 7}, {"image": "val/a.jpg", "img_id": "2"},
                                {"image": "val/c.jpg", "img_id": 0}]))
    assert read_nocaps_images(path, "/data/nocaps", limit=2) == [NocapsImage(7, "/data/nocaps/val/b.jpg"),
                                                                 NocapsImage(2, "/data/nocaps/val/a.jpg")]
    with pytest.raises(ValueError, match="no images to caption \\(limit 0\\)"):
        read_nocaps_images(path, limit=0)
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        read_nocaps_images(tmp_path / "missing.json")


def malformed(change):
    data = coco_references()
    change(data)
    return data


@pytest.mark.parametrize("data, message", [
    ([], "a COCO caption file, an object with \"images\" and \"annotations\""),
    ({"images": []}, "a COCO caption file"),
    (malformed(lambda d: d["images"][1].pop("domain")), "image 0 has domain None"),
    (malformed(lambda d: d["images"][1].update(domain="in_domain")), "image 0 has domain 'in_domain'"),
    (malformed(lambda d: d["images"][2].update(id="7")), "images\\[2\\] has no integer \"id\""),
    (malformed(lambda d: d["images"].append(dict(d["images"][0]))), "image id 4 is listed twice"),
    (malformed(lambda d: d["annotations"].append({"image_id": 99, "caption": "a dog"})),
     "annotations\\[12\\] is about image 99, which \"images\" does not list"),
    (malformed(lambda d: d["annotations"][3].update(caption=None)), "annotations\\[3\\] has no caption string"),
    (malformed(lambda d: d.update(annotations=[a for a in d["annotations"] if a["image_id"] != 9])),
     "1 images have no reference caption \\(first \\[9\\]\\)"),
])
def test_malformed_references_are_refused(tmp_path, data, message):
    path = tmp_path / "refs.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        read_nocaps_references(path)


def test_captions_of_images_without_references_are_refused(references_file):
    with pytest.raises(ValueError, match="2 of the 3 images have no references \\(first ids \\[11, 12\\]\\)"):
        nocaps_metrics(read_nocaps_references(references_file), {4: "a dog", 11: "a cat", 12: "a car"}, java=False)


def test_the_submission_file_is_the_servers_format(tmp_path):
    path = write_nocaps_submission(tmp_path / "out" / "captions.json", {7: "a dog on grass", 0: "a \"red\" car"})
    assert path == tmp_path / "out" / "captions.json"
    assert json.loads(path.read_text(encoding="utf-8")) == [{"image_id": 7, "caption": "a dog on grass"},
                                                            {"image_id": 0, "caption": "a \"red\" car"}]
    assert [p.name for p in path.parent.iterdir()] == ["captions.json"]  # no temporary file left beside it
    for bad in ({"7": "a dog"}, {True: "a dog"}, {7: None}):
        with pytest.raises(ValueError, match="an int image id and a str caption"):
            write_nocaps_submission(tmp_path / "bad.json", bad)
    assert not (tmp_path / "bad.json").exists()


def test_generation_is_the_originals_eval_nocaps():
    # eval_nocaps.py: nocaps.yaml's 3 beams, 20 and 5 tokens, and a repetition penalty train_caption.py does not use
    assert NOCAPS_GENERATION.strategy == "beam" and NOCAPS_GENERATION.num_beams == 3
    assert (NOCAPS_GENERATION.max_length, NOCAPS_GENERATION.min_length) == (20, 5)
    assert NOCAPS_GENERATION.repetition_penalty == 1.1 and EVAL_GENERATION.repetition_penalty == 1.0


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A tiny random captioning checkpoint, five synthetic images in a NoCaps layout, their annotation file and
    references (two in-domain, two near-domain, one out-domain)."""
    root = tmp_path_factory.mktemp("nocaps")
    rng = random.Random(0)
    (root / "val").mkdir()
    images = [(3, "in-domain"), (1, "near-domain"), (8, "out-domain"), (6, "in-domain"), (2, "near-domain")]
    references = {}
    for image_id, _ in images:
        image, text = sample(rng, 48)
        image.save(root / "val" / f"{image_id:016x}.jpg", quality=90)
        references[image_id] = [text, f"a picture with {text}"]
    (root / "nocaps_val.json").write_text(json.dumps([{"image": f"val/{image_id:016x}.jpg", "img_id": image_id}
                                                      for image_id, _ in images]))
    (root / "refs.json").write_text(json.dumps(coco_references(images, references)))
    torch.manual_seed(0)
    model = build_model("caption", preset("tiny", image_size=IMAGE_SIZE)).eval()
    save_salesforce(model, root / "caption.pth")
    return root, model, images


def test_eval_nocaps_command_end_to_end(split, capsys, monkeypatch):
    root, model, images = split
    # the random model repeats no token, so its captions are the same with or without the repetition penalty: the
    # settings are checked where they are passed
    calls = []

    def recorded(model, paths, image_size, generation, batch_size, tokenizer):
        calls.append((generation, batch_size, image_size))
        return caption_images(model, paths, image_size, generation, batch_size, tokenizer)

    monkeypatch.setattr("blip_fast.evaluation.nocaps.caption_images", recorded)
    out, metrics_file = root / "submission" / "captions.json", root / "metrics.json"
    status = main(["eval", "nocaps", "-c", str(root / "caption.pth"), "--device", "cpu",
                   "--annotations", str(root / "nocaps_val.json"), "--image-root", str(root),
                   "--references", str(root / "refs.json"), "--out", str(out), "--no-java", "--batch-size", "2",
                   "--json", str(metrics_file)])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert calls == [(NOCAPS_GENERATION, 2, IMAGE_SIZE)]
    # the captions the checkpoint's model gives the images with eval_nocaps.py's settings, one batch of all of them
    paths = [str(root / "val" / f"{image_id:016x}.jpg") for image_id, _ in images]
    expected = caption_images(model, paths, IMAGE_SIZE, NOCAPS_GENERATION, batch_size=len(paths))
    submission = json.loads(out.read_text(encoding="utf-8"))
    assert submission == [{"image_id": image_id, "caption": caption}
                          for (image_id, _), caption in zip(images, expected, strict=True)]
    references = read_nocaps_references(root / "refs.json")
    metrics, notices = nocaps_metrics(references, {item["image_id"]: item["caption"] for item in submission},
                                      java=False)
    assert json.loads(metrics_file.read_text()) == metrics
    assert list(metrics) == [*DOMAINS, "entire"]
    assert printed.out.splitlines() == [f"wrote 5 captions to {out}",
                                        NocapsResult(5, metrics, notices).summary()]


def test_eval_nocaps_command_submission_only_with_a_limit(split, capsys):
    root, model, images = split
    out = root / "first-two.json"
    status = main(["eval", "nocaps", "-c", str(root / "caption.pth"), "--device", "cpu",
                   "--annotations", str(root / "nocaps_val.json"), "--image-root", str(root), "--out", str(out),
                   "--limit", "2"])
    printed = capsys.readouterr().out.splitlines()
    assert status == 0
    assert [item["image_id"] for item in json.loads(out.read_text())] == [3, 1]
    assert printed[-1] == "NoCaps on 2 images: captions only (no references; the EvalAI server scores them)"


@pytest.mark.parametrize("extra, message", [
    ([], "nothing to do: give --out"),
    (["--out", "x.json", "--json", "m.json"], "--json writes the metrics, which need --references"),
    (["--out", "{root}"], "cannot write .*: it is a directory"),
    (["--out", "x.json", "--annotations", "{root}/refs.json"], "expected a JSON list of annotations"),
    (["--references", "{root}/nocaps_val.json"], "a COCO caption file"),
])
def test_eval_nocaps_command_mistakes_are_one_line(split, capsys, extra, message):
    root, _, _ = split
    args = ["eval", "nocaps", "-c", str(root / "caption.pth"), "--annotations", str(root / "nocaps_val.json"),
            "--image-root", str(root)]
    status = main(args + [a.format(root=root) for a in extra])
    err = capsys.readouterr().err
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err), err
