"""The user API and the command line on real image files and saved checkpoints."""

import random

import pytest
import torch
from PIL import Image

import blip_fast
from blip_fast.checkpoint import save_hf, save_salesforce
from blip_fast.cli import main
from blip_fast.config import tiny_config
from blip_fast.data.synthetic import sample
from blip_fast.images import ImageError, load_image, to_batch
from blip_fast.models import build_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    paths = {}
    for name in ("a", "b"):
        image, _ = sample(rng, 80)
        paths[name] = root / f"{name}.jpg"
        image.save(paths[name], quality=90)
    image, _ = sample(rng, 50)
    paths["gray"] = root / "gray.jpg"
    image.convert("L").save(paths["gray"])
    paths["cmyk"] = root / "cmyk.jpg"
    image.convert("CMYK").save(paths["cmyk"])
    paths["png"] = root / "alpha.png"
    image.convert("RGBA").save(paths["png"])
    paths["truncated"] = root / "truncated.jpg"
    data = paths["a"].read_bytes()
    paths["truncated"].write_bytes(data[: len(data) // 3])
    paths["text"] = root / "notes.jpg"
    paths["text"].write_text("not an image")
    torch.manual_seed(0)
    for task in ("caption", "retrieval", "vqa"):
        paths[task] = root / f"{task}.pth"
        save_salesforce(build_model(task, tiny_config()), paths[task])
    paths["caption_hf"] = root / "caption_hf"
    save_hf(build_model("caption", tiny_config()), paths["caption_hf"])
    return paths


def test_images_of_every_mode_become_rgb_batches(files):
    batch = to_batch([files["a"], files["gray"], files["cmyk"], files["png"]], 64)
    assert batch.shape == (4, 3, 64, 64) and batch.dtype == torch.float32
    assert load_image(files["gray"]).mode == "RGB"
    # a tensor batch passes through untouched
    assert to_batch(batch, 64) is batch


@pytest.mark.parametrize("name,match", [("truncated", "cannot decode"), ("text", "cannot decode")])
def test_corrupt_images_raise_image_error(files, name, match):
    with pytest.raises(ImageError, match=match):
        load_image(files[name])
    with pytest.raises(ImageError, match="image not found"):
        load_image(files["a"].parent / "missing.jpg")


def test_caption_api_on_salesforce_and_hf_checkpoints(files):
    for key in ("caption", "caption_hf"):
        blip = blip_fast.load(files[key], device="cpu")
        captions = blip.caption([files["a"], files["b"]], strategy="greedy", max_length=12, min_length=5)
        assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
        sampled = blip.caption([files["a"]], strategy="nucleus", max_length=10, min_length=3, seed=1)
        assert sampled == blip.caption([files["a"]], strategy="nucleus", max_length=10, min_length=3, seed=1)


def test_retrieval_api(files):
    blip = blip_fast.load(files["retrieval"], task="retrieval", device="cpu")
    sim = blip.similarity([files["a"], files["b"]], ["a red circle", "two blue squares", "a dog"])
    assert sim.shape == (2, 3) and sim.abs().max() <= 1.0 + 1e-6
    probs = blip.match([files["a"], files["b"]], ["a red circle", "a dog"])
    assert probs.shape == (2,) and ((probs >= 0) & (probs <= 1)).all()
    with pytest.raises(ValueError, match="empty after cleaning"):
        blip.embed_texts(["a dog", "..."])
    with pytest.raises(ValueError, match="no texts given"):
        blip.embed_texts([])
    with pytest.raises(ValueError, match="a retrieval model cannot caption"):
        blip.caption([files["a"]])


def test_vqa_api(files):
    blip = blip_fast.load(files["vqa"], device="cpu")
    answers = blip.answer([files["a"]], ["What colour is the circle?"], max_length=5)
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_cli_caption_prints_one_line_per_image(files, capsys):
    assert main(["caption", str(files["a"]), str(files["gray"]), "-c", str(files["caption"]), "--device", "cpu",
                 "--strategy", "greedy", "--max-length", "10", "--min-length", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(files["a"]))


@pytest.mark.parametrize("argv,message", [
    (["caption", "{truncated}", "-c", "{caption}", "--device", "cpu"], "cannot decode image"),
    (["caption", "{a}", "-c", "{retrieval}", "--device", "cpu"], "holds a retrieval model, not caption"),
    (["caption", "{a}", "-c", "/nonexistent.pth", "--device", "cpu"], "checkpoint not found"),
    (["caption", "{a}", "-c", "{text}", "--device", "cpu"], "cannot read checkpoint"),
    (["answer", "{a}", "?", "-c", "{caption}", "--device", "cpu"], "not vqa"),
    (["caption", "{a}", "-c", "{caption}", "--device", "cpu", "--strategy", "nucleus", "--top-k", "-1"], "top_k"),
    (["caption", "{a}", "-c", "{caption}", "--device", "cpu", "--max-length", "8"], "min_length (10)"),
])
def test_cli_user_mistakes_are_one_line_errors(files, capsys, argv, message):
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_cli_convert_and_info(files, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["convert", str(files["caption"]), str(out), "--to", "hf"]) == 0
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    back = tmp_path / "back.pth"
    assert main(["convert", str(out), str(back), "--to", "salesforce", "--task", "caption"]) == 0
    assert main(["info", str(back)]) == 0
    assert '"task": "caption"' in capsys.readouterr().out
    assert main(["convert", str(files["caption"]), str(tmp_path / "x"), "--to", "hf", "--task", "vqa"]) == 2


@pytest.mark.parametrize("target,to,message", [
    ("a_directory", "salesforce", "it is a directory"),
    ("a_file", "hf", "it is a file"),
    # a folder that cannot be made: the OS's own error (root, as in CI containers, writes through permissions, so
    # a read-only folder would not fail there)
    ("a_file/sub/x.pth", "salesforce", "Not a directory"),
])
def test_cli_convert_to_an_unwritable_destination(files, tmp_path, capsys, target, to, message):
    """An OSError of the write is a user's problem (a path in the way, a folder that cannot be made): one line,
    exit 2."""
    (tmp_path / "a_directory").mkdir()
    (tmp_path / "a_file").write_text("x")
    assert main(["convert", str(files["caption"]), str(tmp_path / target), "--to", to]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_match(files, capsys):
    assert main(["match", str(files["a"]), "a red circle", "a dog", "-c", str(files["retrieval"]),
                 "--device", "cpu"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3


def test_pil_image_input(files):
    blip = blip_fast.load(files["caption"], device="cpu")
    image = Image.open(files["a"])
    assert len(blip.caption(image, strategy="greedy", max_length=8, min_length=2)) == 1


def test_compiled_and_bf16_captioning(files, capsys, monkeypatch):
    # compile=True compiles the blocks (aot_eager here: dynamo's graphs without inductor's code generation); fp32
    # captions equal eager's. The CLI's --compile and --dtype reach load().
    import torch
    from compile_checks import compile_with_aot_eager

    from blip_fast import api

    compiled = compile_with_aot_eager(monkeypatch, api)
    torch._dynamo.reset()
    paths = [files["a"], files["b"]]
    eager = blip_fast.load(files["caption"], device="cpu").caption(paths, max_length=10, min_length=4)
    assert blip_fast.load(files["caption"], device="cpu", compile=True).caption(paths, max_length=10,
                                                                                 min_length=4) == eager
    assert compiled == ["caption"]
    loaded = []
    real_load = api.load

    def recording_load(*args, **kwargs):
        loaded.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(api, "load", recording_load)
    assert main(["caption", str(files["a"]), "-c", str(files["caption"]), "--device", "cpu", "--dtype", "bf16",
                 "--compile", "--strategy", "greedy", "--max-length", "8", "--min-length", "4"]) == 0
    torch._dynamo.reset()
    assert (loaded[0]["dtype"], loaded[0]["compile"]) == (torch.bfloat16, True)
    assert capsys.readouterr().out.startswith(str(files["a"]) + "\t")


def test_captions_in_chunks_equal_one_batch_and_samples_come_image_by_image(files, capsys):
    blip = blip_fast.load(files["caption"], device="cpu")
    paths = [files["a"], files["gray"], files["cmyk"], files["png"], files["b"]]
    whole = blip.caption(paths, strategy="beam", max_length=10, min_length=4)
    assert blip.caption(paths, strategy="beam", max_length=10, min_length=4, batch_size=2) == whole
    sampled = blip.caption(paths[:2], strategy="nucleus", max_length=10, min_length=4, seed=3,
                           num_return_sequences=3, batch_size=1)
    # batch_size 1: each image's three samples drawn alone, as captioning that image alone
    assert sampled[:3] == blip.caption(paths[:1], strategy="nucleus", max_length=10, min_length=4, seed=3,
                                       num_return_sequences=3)
    assert len(sampled) == 6
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        blip.caption(paths, batch_size=0)
    with pytest.raises(ValueError, match="no images given"):
        blip.caption([])
    assert main(["caption", str(files["a"]), str(files["b"]), "-c", str(files["caption"]), "--device", "cpu",
                 "--strategy", "nucleus", "--num-return-sequences", "2", "--seed", "1", "--max-length", "10",
                 "--min-length", "4", "--batch-size", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(files["a"])] * 2 + [str(files["b"])] * 2
