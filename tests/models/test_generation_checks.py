"""Decoding rules the Hugging Face parity tests do not pin: the top-k cut of nucleus sampling, and
clear errors for lengths and prompts that decoding cannot honour."""

import math

import pytest
import torch

from blip_fast.api import Blip
from blip_fast.config import tiny_config
from blip_fast.models import GenerationConfig, build_model, generate
from blip_fast.models.generation import _process, _sampling_filter
from blip_fast.shapes import VOCAB_SIZE

DEC, SEP, PAD = 30522, 102, 0
PROMPT = [[DEC, 1037, 3861, 1997]]  # [DEC] a picture of


@pytest.fixture(scope="module")
def caption():
    torch.manual_seed(0)
    return build_model("caption", tiny_config()).eval()


def sampleable_reference(scores: torch.Tensor, top_k: int, top_p: float) -> list[set[int]]:
    """Per row, the tokens sampling may pick, spelled out: the ``top_k`` best scores and every
    token tied with the k-th; of those, from the most likely down, each token whose predecessors'
    probability has not yet reached ``top_p`` (so at least the best one)."""
    kept = []
    for row in scores.double().tolist():
        order = sorted(range(len(row)), key=lambda t: -row[t])
        if top_k:
            kth = row[order[min(top_k, len(row)) - 1]]
            order = [t for t in order if row[t] >= kth]
        top = row[order[0]]
        weights = [math.exp(row[t] - top) for t in order]
        total, mass, row_kept = sum(weights), 0.0, set()
        for t, w in zip(order, weights, strict=True):
            if row_kept and mass >= top_p:
                break
            row_kept.add(t)
            mass += w / total
        kept.append(row_kept)
    return kept


def allowed(scores: torch.Tensor, top_k: int, top_p: float) -> list[set[int]]:
    config = GenerationConfig(strategy="nucleus", top_k=top_k, top_p=top_p)
    mask = torch.isfinite(_sampling_filter(scores, config))
    return [set(torch.nonzero(row).flatten().tolist()) for row in mask]


def tied_scores(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Spread-out scores where the 11th to 13th best tokens are raised to the 5th best value:
    a top-5 cut keeps 8 tokens."""
    scores = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    order = scores.argsort(dim=-1, descending=True)
    kth = scores.gather(1, order[:, 4:5])  # (rows, 1)
    return scores.scatter(1, order[:, 10:13], kth.expand(-1, 3))


@pytest.mark.parametrize("top_k, top_p", [(50, 0.9), (5, 1.0), (5, 0.5), (1, 0.9), (0, 0.9), (0, 1.0), (500, 0.3)])
def test_sampling_filter_is_top_k_then_top_p(top_k, top_p):
    # distinct scores: which of several tied tokens top-p keeps depends on the sort, not the rule
    for seed in range(3):
        scores = torch.randn(4, 257, generator=torch.Generator().manual_seed(seed)) * 3
        assert allowed(scores, top_k, top_p) == sampleable_reference(scores, top_k, top_p)


def test_top_k_keeps_every_token_tied_with_the_kth():
    scores = tied_scores(4, 257, 0)
    kept = allowed(scores, 5, 1.0)
    assert kept == sampleable_reference(scores, 5, 1.0) and all(len(row) == 8 for row in kept)


@pytest.mark.parametrize("top_k, top_p", [(50, 0.9), (5, 1.0), (1, 0.95), (0, 0.9), (40000, 0.7)])
def test_sampling_filter_matches_hugging_face_warpers(top_k, top_p):
    warpers = pytest.importorskip("transformers.generation.logits_process")
    untied = torch.randn(3, VOCAB_SIZE, generator=torch.Generator().manual_seed(1))
    scores = torch.cat([tied_scores(3, VOCAB_SIZE, 0), untied])
    ids = torch.tensor(PROMPT * 6)
    theirs = scores.clone()
    if top_k:  # HF's generate adds no top-k warper for top_k=0
        theirs = warpers.TopKLogitsWarper(top_k)(ids, theirs)
    theirs = warpers.TopPLogitsWarper(top_p)(ids, theirs)
    config = GenerationConfig(strategy="nucleus", top_k=top_k, top_p=top_p)
    assert torch.equal(torch.isfinite(_sampling_filter(scores, config)), torch.isfinite(theirs))


def test_nucleus_sampling_only_picks_from_the_top_k(caption):
    # an untrained decoder's next-token distribution is nearly flat: top-p 0.9 alone keeps
    # thousands of tokens, so 64 draws would almost surely leave the 50 best
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prompt = torch.tensor(PROMPT)
    config = GenerationConfig(strategy="nucleus", max_length=5, min_length=0, top_k=50, repetition_penalty=1.1)
    context = caption.image_embeds(images)
    decoder = caption.text_decoder
    with torch.no_grad():
        logits = decoder.logits(decoder.hidden_states(prompt, None, context))[:, -1].float()
    expected = sampleable_reference(_process(logits, prompt, config, SEP), 50, 0.9)[0]
    assert len(expected) <= 50
    out = generate(decoder, prompt.expand(64, -1), context.expand(64, -1, -1), None, config, SEP, PAD,
                   torch.Generator().manual_seed(0))
    assert set(out[:, -1].tolist()) <= expected


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_top_k_leaves_greedy_and_beam_search_alone(caption, strategy):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prompt = torch.tensor(PROMPT * 2)
    outs = [caption.generate(images, prompt, GenerationConfig(strategy=strategy, max_length=8, min_length=6,
                                                              top_k=top_k))
            for top_k in (0, 1, 50)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("fields, match", [
    (dict(max_length=5, min_length=10), r"min_length \(10\) must not exceed max_length \(5\)"),
    (dict(top_k=-1), "top_k must be an int >= 0"),
    (dict(top_k=2.5), "top_k must be an int >= 0"),
    (dict(top_k=True), "top_k must be an int >= 0"),
])
def test_generation_config_rejects(fields, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig(**fields)


def test_generation_config_accepts_equal_lengths_and_no_top_k():
    config = GenerationConfig(max_length=7, min_length=7, top_k=0)
    assert (config.min_length, config.top_k) == (7, 0)


@pytest.mark.parametrize("strategy", ["greedy", "beam", "nucleus"])
@pytest.mark.parametrize("max_length", [3, 4])  # below and at the 4-token prompt
def test_max_length_must_leave_room_after_the_prompt(caption, strategy, max_length):
    images = torch.randn(2, 3, 64, 64)
    config = GenerationConfig(strategy=strategy, max_length=max_length, min_length=0)
    with pytest.raises(ValueError, match=rf"max_length \({max_length}\) must exceed the prompt length \(4 tokens\)"):
        caption.generate(images, torch.tensor(PROMPT * 2), config, torch.Generator().manual_seed(0))
    # one token of room is enough
    out = caption.generate(images, torch.tensor(PROMPT * 2), GenerationConfig(strategy=strategy, max_length=5,
                                                                              min_length=0))
    assert out.shape == (2, 5)


@pytest.mark.parametrize("strategy", ["greedy", "beam", "nucleus"])
def test_prompts_decoding_cannot_start_from_are_clear_errors(caption, strategy):
    images = torch.randn(2, 3, 64, 64)
    context = caption.image_embeds(images)
    config = GenerationConfig(strategy=strategy, max_length=6, min_length=0)
    empty = torch.empty(2, 0, dtype=torch.long)
    with pytest.raises(ValueError, match="at least one token per row"):
        caption.generate(images, empty, config)
    with pytest.raises(ValueError, match="at least one token per row"):
        generate(caption.text_decoder, empty, context, None, config, SEP, PAD)
    for bad in (torch.full((2, 2), float(DEC)), torch.tensor([DEC, 1037]), torch.ones(2, 2, dtype=torch.bool)):
        with pytest.raises(ValueError, match="2-D integer tensor"):
            generate(caption.text_decoder, bad, context, None, config, SEP, PAD)


def test_caption_names_the_prompt_when_max_length_leaves_no_room(caption):
    blip = Blip(caption)
    images = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"max_length \(4\) counts the prompt 'a picture of ', which is 4 tokens"):
        blip.caption(images, strategy="greedy", max_length=4, min_length=0)
    with pytest.raises(ValueError, match=r"min_length \(10\) must not exceed max_length \(8\)"):
        blip.caption(images, max_length=8)
    assert len(blip.caption(images, strategy="nucleus", max_length=6, min_length=0, top_k=5, seed=0)) == 1


@pytest.mark.parametrize("check_every", [1, 3, 8])
@pytest.mark.parametrize("strategy", ["greedy", "beam", "nucleus"])
def test_reading_the_stop_flag_less_often_changes_no_output(caption, monkeypatch, strategy, check_every):
    # the loops read their stopping flag every CHECK_EVERY tokens; the steps run past the end must leave the
    # output exactly as stopping at once does (rows of a random decoder end at different steps)
    import blip_fast.models.generation as generation

    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    prompt = torch.tensor(PROMPT * 4)
    config = GenerationConfig(strategy=strategy, max_length=14, min_length=2, num_beams=3)
    outputs = []
    for every in (1, check_every):
        monkeypatch.setattr(generation, "CHECK_EVERY", every)
        outputs.append(caption.generate(images, prompt, config, torch.Generator().manual_seed(5)))
    assert torch.equal(outputs[0], outputs[1])


def test_sampled_captions_per_image_share_its_context_and_equal_repeated_images(caption):
    # num_return_sequences: the image's keys/values held once for its samples; the same draws as the image
    # repeated that many times (fp32; the stacked attention rounds alike here, so the tokens are equal)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    config = GenerationConfig(strategy="nucleus", max_length=10, min_length=3, top_k=0, num_return_sequences=3)
    shared = caption.generate(images, torch.tensor(PROMPT * 2), config, torch.Generator().manual_seed(7))
    repeated = caption.generate(images.repeat_interleave(3, 0), torch.tensor(PROMPT * 6),
                                GenerationConfig(strategy="nucleus", max_length=10, min_length=3, top_k=0),
                                torch.Generator().manual_seed(7))
    assert shared.shape[0] == 6
    assert torch.equal(shared, repeated)
    again = caption.generate(images, torch.tensor(PROMPT * 2), config, torch.Generator().manual_seed(7))
    assert torch.equal(shared, again)  # reproducible under a seed


def test_shared_context_cache_decodes_as_a_repeated_context(caption):
    # a cache whose context rows each serve 3 decoded rows gives the logits of the context repeated 3 times
    from blip_fast.models.med import KVCache

    decoder = caption.text_decoder
    context = caption.image_embeds(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4)))
    ids = torch.randint(1000, 2000, (6, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = decoder.logits(decoder.hidden_states(ids, None, context.repeat_interleave(3, 0)))
        shared, repeated = KVCache.empty(2, 5, shared_by=3), KVCache.empty(2, 5)
        steps = {id(shared): [], id(repeated): []}
        for cache, ctx in ((shared, context), (repeated, context.repeat_interleave(3, 0))):
            steps[id(cache)].append(decoder.logits(decoder.hidden_states(ids[:, :2], None, ctx, cache=cache)))
            for t in range(2, 5):
                steps[id(cache)].append(decoder.logits(decoder.hidden_states(ids[:, t:t + 1], None, ctx,
                                                                             cache=cache)))
    for cache in (shared, repeated):
        torch.testing.assert_close(torch.cat(steps[id(cache)], dim=1), full, rtol=1e-5, atol=1e-5)
    assert shared.cross_kv[0][0].shape[0] == 2 and repeated.cross_kv[0][0].shape[0] == 6
    with pytest.raises(ValueError, match="holds 5 tokens"):
        decoder.hidden_states(ids[:, :1], None, context, cache=shared)


@pytest.mark.parametrize("fields, match", [
    (dict(strategy="beam", num_return_sequences=2), "needs strategy='nucleus'"),
    (dict(strategy="nucleus", num_return_sequences=0), "num_return_sequences must be an int >= 1"),
])
def test_num_return_sequences_is_checked(fields, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig(**fields)


def _static_and_dynamic_step_scores(decoder, context, ids, shared_by):
    """Per one-token step after a 2-token prompt, the scores of a dynamic cache and of a static-mode one."""
    from blip_fast.models.generation import _DecodeSteps
    from blip_fast.models.med import KVCache

    scores = {}
    for mode in ("dynamic", "static"):
        cache = KVCache.empty(2, ids.shape[1], shared_by=shared_by)
        steps = _DecodeSteps(decoder, context, None, cache, mode)
        with torch.no_grad():
            scores[mode] = [steps(ids[:, :2]).clone()] + [steps(ids[:, t:t + 1]).clone()
                                                          for t in range(2, ids.shape[1])]
        assert cache.length == ids.shape[1]
    return scores


@pytest.mark.parametrize("shared_by", [1, 3])
def test_static_decode_steps_give_the_dynamic_scores(caption, shared_by):
    # static mode: every step writes its slot at a device position and attends to the whole buffer, masked past
    # it; fp32 scores equal the dynamic cache's to 1e-5 at every step (odd capacity 9, shared and unshared context)
    decoder = caption.text_decoder
    context = caption.image_embeds(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6)))
    ids = torch.randint(1000, 2000, (2 * shared_by, 9), generator=torch.Generator().manual_seed(6))
    scores = _static_and_dynamic_step_scores(decoder, context, ids, shared_by)
    for dynamic, static in zip(scores["dynamic"], scores["static"], strict=True):
        torch.testing.assert_close(static, dynamic, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["greedy", "beam", "nucleus"])
@pytest.mark.parametrize("forced", [False, True], ids=["natural", "forced"])
def test_static_decoding_writes_the_dynamic_tokens(caption, strategy, forced):
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    prompt = torch.tensor(PROMPT * 3)
    outputs = [caption.generate(images, prompt, GenerationConfig(
        strategy=strategy, max_length=15, min_length=15 if forced else 5, num_beams=3, decode_step=mode),
        torch.Generator().manual_seed(9)) for mode in ("dynamic", "static")]
    assert torch.equal(outputs[0], outputs[1])


def test_decode_step_is_checked(caption):
    with pytest.raises(ValueError, match="decode_step must be one of dynamic, static, cuda_graph"):
        GenerationConfig(decode_step="graph")
    images, prompt = torch.randn(1, 3, 64, 64), torch.tensor(PROMPT)
    with pytest.raises(ValueError, match="needs CUDA; the context is on cpu"):
        caption.generate(images, prompt, GenerationConfig(decode_step="cuda_graph", max_length=8, min_length=5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("strategy", ["greedy", "beam", "nucleus"])
def test_cuda_graph_decoding_writes_the_dynamic_tokens(caption, strategy):
    # the static step captured once per call and replayed; fp32 on the GPU: the tokens of the dynamic cache
    import copy

    model = copy.deepcopy(caption).cuda()
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(10)).cuda()
    prompt = torch.tensor(PROMPT * 4).cuda()
    outputs = [model.generate(images, prompt, GenerationConfig(strategy=strategy, max_length=16, min_length=6,
                                                               num_beams=3, decode_step=mode),
                              torch.Generator("cuda").manual_seed(11)) for mode in ("dynamic", "cuda_graph")]
    assert torch.equal(outputs[0], outputs[1])
