"""Zero-shot video retrieval (blip_fast.evaluation.video_retrieval): the video features and both score matrices
against the original ``eval_retrieval_video.py`` ``evaluation()`` written out as its per-video loops (fp32; 1e-5,
the rounding of other batch compositions), its ``itm_eval`` on hand-worked ranks and on scores without ties, and
``blip-fast eval video`` on the synthetic video set."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from blip_fast.checkpoint import save_salesforce
from blip_fast.cli import build_parser, main
from blip_fast.config import tiny_config
from blip_fast.data.synth_tasks import write_task_dataset
from blip_fast.data.video import VideoAnnotations, VideoFrames
from blip_fast.evaluation.retrieval import retrieval_scores
from blip_fast.evaluation.video_retrieval import (
    VideoSource,
    evaluate_video_retrieval,
    load_video_split,
    video_recall,
)
from blip_fast.models import build_model
from blip_fast.models.blip_retrieval import BlipRetrieval

pytest.importorskip("av")

TOLERANCE = dict(rtol=1e-5, atol=1e-5)
SIZE, FRAMES = 32, 8
ORIGINAL_KEYS = ["txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "vid_r1", "vid_r5", "vid_r10", "vid_r_mean",
                 "vid_mdR", "r_mean"]


@pytest.fixture(scope="module")
def video_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("msrvtt")
    write_task_dataset(out, "video", n=6, image_size=SIZE, seed=3)
    return out, VideoAnnotations(out / "msrvtt_test.jsonl", out / "videos")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BlipRetrieval(tiny_config(image_size=SIZE)).eval()


@torch.no_grad()
def original_evaluation(model, videos, text_ids, text_atts, k):
    """eval_retrieval_video.py's evaluation() for one process and one batch of (B, N, C, W, H) videos."""
    text_embeds = model.text_features(text_ids, text_atts)
    text_ids = model.with_enc(text_ids)
    B, N, C, W, H = videos.size()
    video = videos.view(-1, C, W, H)
    video_feat = model.visual_encoder(video)
    video_embed = model.vision_proj(video_feat[:, 0, :])
    video_embed = video_embed.view(B, N, -1).mean(dim=1)
    video_embed = F.normalize(video_embed, dim=-1)
    video_feat = video_feat.view(B, -1, video_feat.shape[-1])
    sims_matrix = video_embed @ text_embeds.t()
    score_matrix_v2t = torch.full((len(text_ids), len(text_ids)), -100.0)
    for i, sims in enumerate(sims_matrix):
        topk_sim, topk_idx = sims.topk(k=k, dim=0)
        encoder_output = video_feat[i].repeat(k, 1, 1)
        score = model.itm_logits(encoder_output, text_ids[topk_idx], text_atts[topk_idx])[:, 1]
        score_matrix_v2t[i, topk_idx] = score + topk_sim
    score_matrix_t2v = torch.full((len(text_ids), len(text_ids)), -100.0)
    for i, sims in enumerate(sims_matrix.t()):
        topk_sim, topk_idx = sims.topk(k=k, dim=0)
        encoder_output = video_feat[topk_idx]
        score = model.itm_logits(encoder_output, text_ids[i].repeat(k, 1), text_atts[i].repeat(k, 1))[:, 1]
        score_matrix_t2v[i, topk_idx] = score + topk_sim
    return video_feat, video_embed, score_matrix_v2t, score_matrix_t2v


def original_itm_eval(scores_v2t, scores_t2v, txt2vmg, vid2txt):
    """eval_retrieval_video.py's itm_eval: positions in a sort, one caption per video."""
    def ranks_of(scores, gold):
        return np.array([np.where(np.argsort(row)[::-1] == gold[i])[0][0] for i, row in enumerate(scores)])

    ranks = ranks_of(scores_v2t, vid2txt)
    tr1, tr5, tr10 = (100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10))
    ranks = ranks_of(scores_t2v, txt2vmg)
    mdR = np.median(ranks + 1)
    vr1, vr5, vr10 = (100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10))
    tr_mean, vr_mean = (tr1 + tr5 + tr10) / 3, (vr1 + vr5 + vr10) / 3
    return {"txt_r1": tr1, "txt_r5": tr5, "txt_r10": tr10, "txt_r_mean": tr_mean, "vid_r1": vr1, "vid_r5": vr5,
            "vid_r10": vr10, "vid_r_mean": vr_mean, "vid_mdR": mdR, "r_mean": (tr_mean + vr_mean) / 2}


@pytest.mark.parametrize("batch_size", [2, 4, 64])
def test_video_features_are_the_originals(video_set, model, batch_size):
    _, annotations = video_set
    paths, ids, mask = load_video_split(annotations)
    reader = VideoFrames(SIZE, FRAMES, decoder="cpu", workers=2)
    source = VideoSource(paths, reader)
    with torch.no_grad():
        chunks = [source.encode(model, start, min(start + batch_size, len(source)))
                  for start in range(0, len(source), batch_size)]
    context, features = torch.cat([c for c, _ in chunks]), torch.cat([f for _, f in chunks])
    video_feat, video_embed, _, _ = original_evaluation(model, reader.read_many(paths), ids, mask, k=1)
    assert context.shape == (6, FRAMES * (1 + (SIZE // 16) ** 2), 64)
    torch.testing.assert_close(context, video_feat, **TOLERANCE)
    torch.testing.assert_close(features, video_embed, **TOLERANCE)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(6), **TOLERANCE)


@pytest.mark.parametrize(("k", "batch_size"), [(3, 2), (6, 4), (1, 64)])
def test_scores_are_the_originals(video_set, model, k, batch_size):
    _, annotations = video_set
    paths, ids, mask = load_video_split(annotations)
    reader = VideoFrames(SIZE, FRAMES, decoder="cpu", workers=2)
    got = retrieval_scores(model, VideoSource(paths, reader), ids, mask, itm_k=k, batch_size=batch_size)
    expected = original_evaluation(model, reader.read_many(paths), ids, mask, k)[2:]
    for ours, original in zip(got, expected, strict=True):
        torch.testing.assert_close(ours, original, **TOLERANCE)
        assert int((ours > -100).sum()) == 6 * k


def test_evaluate_video_retrieval_is_the_original_end_to_end(video_set, model):
    _, annotations = video_set
    result = evaluate_video_retrieval(model, annotations, SIZE, frames=FRAMES, itm_k=4, batch_size=4, decoder="cpu")
    paths, ids, mask = load_video_split(annotations)
    videos = VideoFrames(SIZE, FRAMES, decoder="cpu").read_many(paths)
    _, _, v2t, t2v = original_evaluation(model, videos, ids, mask, k=4)
    # the two agree on ranks wherever nothing ties with the right item; -100 ties only outside both top 4s
    expected = video_recall(v2t, t2v)
    assert result.metrics == pytest.approx(expected, abs=1e-9)
    assert list(result.metrics) == [*ORIGINAL_KEYS, "chance_r1"]
    assert (result.videos, result.texts, result.frames, result.itm_k, result.decoder) == (6, 6, FRAMES, 4, "pyav")
    assert result.score == result.metrics["r_mean"] and "6 videos / 6 captions" in result.summary()
    assert model.training is False
    limited = evaluate_video_retrieval(model, annotations, SIZE, frames=2, itm_k=0, limit=3, decoder="cpu")
    assert limited.videos == 3 and "ITC," in limited.summary()


def test_captions_are_cleaned_as_the_original(tmp_path):
    words = " ".join(f"w{i}" for i in range(50))
    (tmp_path / "a.jsonl").write_text(json.dumps({"clip_name": "v", "caption": f"A Dog, runs! {words}"}) + "\n")
    _, ids, mask = load_video_split(VideoAnnotations(tmp_path / "a.jsonl", tmp_path))
    assert ids.shape == (1, 35) and int(mask.sum()) == 35     # 40 words cut to 35 tokens
    (tmp_path / "b.jsonl").write_text(json.dumps({"clip_name": "v", "caption": "..."}) + "\n")
    with pytest.raises(ValueError, match="the caption of v is empty once cleaned"):
        load_video_split(VideoAnnotations(tmp_path / "b.jsonl", tmp_path))


# --- itm_eval ----------------------------------------------------------------------------------------------------

def scores_with_ranks(ranks, ties=()):
    """(n, n) scores, the right item of row i on the diagonal at 0.5 with ``ranks[i]`` others at 0.9 (rows in
    ``ties``: that many others at 0.5 instead, the same rank counted against the model), the rest at 0.1."""
    n = len(ranks)
    scores = torch.full((n, n), 0.1)
    for i, rank in enumerate(ranks):
        others = [j for j in range(n) if j != i][:rank]
        scores[i, i] = 0.5
        scores[i, others] = 0.5 if i in ties else 0.9
    return scores


def test_hand_worked_recalls_and_median_rank():
    # text -> video: ranks 0 0 0 1 3 4 5 7 9 10 11, and 2 by a tie with two other videos
    t2v = scores_with_ranks([0, 0, 0, 1, 3, 4, 5, 7, 9, 10, 11, 2], ties=(11,))
    # video -> text: ranks 0 1 1 2 5 6 7 8 9 10 11 0
    v2t = scores_with_ranks([0, 1, 1, 2, 5, 6, 7, 8, 9, 10, 11, 0])
    m = video_recall(v2t, t2v)
    assert m["vid_r1"] == pytest.approx(100 * 3 / 12)    # ranks < 1: three
    assert m["vid_r5"] == pytest.approx(100 * 7 / 12)    # 0 0 0 1 3 4 and the tie's 2
    assert m["vid_r10"] == pytest.approx(100 * 10 / 12)  # all but 10 and 11
    assert m["vid_mdR"] == 4.5  # 1-based ranks sorted 1 1 1 2 3 4 5 6 8 10 11 12: the 6th and 7th are 4 and 5
    assert m["txt_r1"] == pytest.approx(100 * 2 / 12)
    assert m["txt_r5"] == pytest.approx(100 * 5 / 12)    # 0 1 1 2 0 (5 is not below 5)
    assert m["txt_r10"] == pytest.approx(100 * 10 / 12)
    assert m["vid_r_mean"] == pytest.approx((m["vid_r1"] + m["vid_r5"] + m["vid_r10"]) / 3)
    assert m["r_mean"] == pytest.approx((m["txt_r_mean"] + m["vid_r_mean"]) / 2)
    assert m["chance_r1"] == pytest.approx(100 / 12)


def test_equal_to_the_original_itm_eval_without_ties():
    generator = torch.Generator().manual_seed(1)
    for n in (1, 2, 7, 30, 101):
        v2t, t2v = torch.rand(n, n, generator=generator), torch.rand(n, n, generator=generator)
        ours = video_recall(v2t, t2v)
        original = original_itm_eval(v2t.numpy(), t2v.numpy(), list(range(n)), list(range(n)))
        assert {key: ours[key] for key in ORIGINAL_KEYS} == pytest.approx(original, abs=1e-9)


def test_malformed_scores_are_refused():
    with pytest.raises(ValueError, match="expected"):
        video_recall(torch.zeros(3, 4), torch.zeros(4, 3))


# --- the command -------------------------------------------------------------------------------------------------

def test_blip_fast_eval_video_on_the_synthetic_set(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["data", "synth", "--task", "video", "--out", str(data), "--n", "5", "--image-size", "32"]) == 0
    torch.manual_seed(0)
    checkpoints = {}
    for task in ("retrieval", "pretrain", "caption"):
        checkpoints[task] = tmp_path / f"{task}.pth"
        save_salesforce(build_model(task, tiny_config(image_size=SIZE)), checkpoints[task])
    common = ["--annotations", str(data / "msrvtt_test.jsonl"), "--video-root", str(data / "videos"),
              "--frames", "4", "--batch-size", "2", "--decoder", "cpu"]
    capsys.readouterr()
    for task in ("retrieval", "pretrain"):
        metrics = tmp_path / f"{task}.json"
        assert main(["eval", "video", "-c", str(checkpoints[task]), *common, "--json", str(metrics)]) == 0
        assert "video retrieval on 5 videos / 5 captions (4 frames, ITC top-128 re-ranked by ITM, pyav)" in \
            capsys.readouterr().out
        written = json.loads(metrics.read_text())
        assert list(written) == [*ORIGINAL_KEYS, "chance_r1"]
        assert all(0 <= written[key] <= 100 for key in ORIGINAL_KEYS if key != "vid_mdR")
        assert 1 <= written["vid_mdR"] <= 5
    assert main(["eval", "video", "-c", str(checkpoints["caption"]), *common]) == 2
    assert "holds a caption model; this evaluation needs a retrieval or pretrain checkpoint" in capsys.readouterr().err
    (data / "videos" / "video3.mp4").unlink()
    assert main(["eval", "video", "-c", str(checkpoints["retrieval"]), *common]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: video not found:") and "video3.mp4" in err and err.count("\n") == 1


def test_the_shipped_msrvtt_config_is_the_commands_defaults():
    from importlib.resources import files

    config = yaml.safe_load(files("blip_fast").joinpath("configs/retrieval_msrvtt.yaml").read_text())
    args = build_parser().parse_args(["eval", "video", "-c", "m.pth", "--annotations", "a.jsonl",
                                      "--video-root", "videos"])
    assert (args.k, args.frames, args.batch_size) == (config["k_test"], config["num_frm_test"], config["batch_size"])
    assert (config["image_size"], config["vit"], args.decoder) == (384, "base", "auto")
