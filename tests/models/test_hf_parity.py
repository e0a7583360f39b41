"""Our BLIP against Hugging Face ``transformers``' BLIP: same weights, same inputs, same outputs.

Hugging Face's ``BlipForImageTextRetrieval``, ``BlipForConditionalGeneration`` and
``BlipForQuestionAnswering`` are an independent implementation of the original BLIP. Each is built
here from a small ``BlipConfig`` with weights drawn far from the default init (a random std of 0.05
to 0.25 per tensor, i.e. 2.5 to 12 times HF's 0.02; LayerNorm weights around 1; non-zero biases: a
near-constant init would hide a swapped or missing weight), saved with ``save_pretrained`` and read
back with :func:`blip_fast.checkpoint.load_hf`. Both models then see identical inputs.

Tolerance, with ``rel_err(ours, hf) = max|ours - hf| / max|hf|`` over the whole output tensor:

* fp32 (both models and inputs float32): ``rel_err <= 1e-5``;
* fp64 (both models converted with ``.double()``): ``rel_err <= 1e-10``. fp32 rounding alone puts
  HF 1e-6 to 5e-5 away from its own fp64 result when weights are spread wider (std up to 0.5),
  so fp32 agreement cannot tell an exact re-implementation from a near miss there; fp64 can
  (the two agree to about 1e-14).
* generated tokens (fp32): equal.

Captions have 0 to 13 words with padding; batches of 1 to 5.

What Hugging Face does differently, and how the comparisons line up the inputs:

* HF's ITM and VQA encoders read ``input_ids`` as given, ours as given too (``itm_logits``) or
  with [ENC] substituted for [CLS] (VQA, as the original BLIP): HF gets ids already starting with
  [ENC] = 30523.
* HF's caption ``generate`` puts [DEC] first and drops the prompt's last token ([SEP]); ours puts
  [DEC] first and takes the prompt without its [SEP].
* HF 5.x beam search fills the positions after a finished caption with [SEP] rather than [PAD]
  (``pad_token_id or eos_token_id`` in ``_beam_search`` treats pad id 0 as missing); ours pads with
  [PAD] as the original BLIP (HF 4.15 ``BeamSearchScorer.finalize``). Beam outputs are compared
  after mapping HF's post-[SEP] fill to [PAD]; every other position must be identical.
* The VQA training loss: HF averages the label-smoothed CE over the batch's answer tokens, ours
  sums it per answer, weights the answers and divides by the number of questions. The test checks
  ``ours == sum_i w_i * n_i * hf_i / B`` with ``hf_i`` HF's loss of answer ``i`` alone and ``n_i``
  its target count.
* HF 5.x drops every cross-attention mask (``BlipTextAttention`` hands it to
  ``BlipTextSelfAttention`` as ``attention_mask``, which a cross-attention then replaces by its unset
  ``encoder_attention_mask``). Image masks are all ones, so only the VQA training loss with padded
  questions is affected: HF's answer decoder attends to the padding, ours does not (as the original).
  Questions reach HF unpadded there; ``test_hf_vqa_decoder_ignores_question_padding`` pins the
  behaviour down.

A base-size model (ViT-B/16 at 224 px, BERT-base) is not compared here: one retrieval comparison
takes about 37 s on the 2-core CPU (HF build 4 s, ``save_pretrained`` 3.6 s, ``load_hf`` 18 s --
mostly ``build_model`` initialising and deep-copying the momentum encoders --, forwards 10 s), over
the 30 s budget. Run by hand, its fp32 ITM logits agreed to a rel err of 1.5e-6.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from tensor_checks import rel_err
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipForQuestionAnswering

from blip_fast.checkpoint import load_hf
from blip_fast.models import GenerationConfig
from blip_fast.models.vit import position_embedding_for
from blip_fast.shapes import VOCAB_SIZE
from blip_fast.tolerances import RTOL

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
PAD, CLS, SEP, DEC, ENC = 0, 101, 102, 30522, 30523
IMAGE = 64
SEP_SCALE, SEP_BIAS = 5.0, 5.0
"""[SEP]'s decoder embedding (tied to the LM head) is scaled and its LM bias raised so that generated
captions end at varied lengths, some before ``max_length`` and some not (with the weights drawn here
[SEP] would otherwise never win)."""


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    """``rel_err(ours, theirs) <= RTOL[dtype]``; the message counts the values that are off."""
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} vs HF {tuple(theirs.shape)}"
    assert ours.dtype == theirs.dtype, f"{what}: dtype {ours.dtype} vs HF {theirs.dtype}"
    assert torch.isfinite(theirs).all(), f"{what}: HF output is not finite"
    rtol, err = RTOL[theirs.dtype], rel_err(ours, theirs)
    off = ~torch.isclose(ours, theirs, rtol=0, atol=rtol * theirs.abs().max().item())
    assert err <= rtol, (f"{what} ({theirs.dtype}): rel err {err:.3g} > {rtol} (max|hf| "
                         f"{theirs.abs().max().item():.4g}; {int(off.sum())} of {theirs.numel()} values off)")


def assert_same_tokens(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.shape == theirs.shape and torch.equal(ours, theirs), f"{what}:\nours\n{ours}\nHF\n{theirs}"


def hf_config(image_size: int = IMAGE, vision_intermediate: int = 256) -> transformers.BlipConfig:
    return transformers.BlipConfig(
        vision_config=dict(hidden_size=64, intermediate_size=vision_intermediate, num_hidden_layers=2,
                           num_attention_heads=4, image_size=image_size, patch_size=16),
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=VOCAB_SIZE, max_position_embeddings=64, label_smoothing=0.1,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        image_text_hidden_size=32,
        label_smoothing=0.1,
    )


@torch.no_grad()
def spread_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Redraw every parameter: N(0, s^2) with s ~ U(0.05, 0.25) per tensor, LayerNorm weights N(1, 0.2^2)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name.lower() and name.endswith("weight"):
            param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
        else:
            std = 0.05 + 0.2 * torch.rand((), generator=generator).item()
            param.copy_(std * torch.randn(param.shape, generator=generator))
    return model.eval()


class Pair:
    """An HF model and ours loaded from its ``save_pretrained`` directory; ``pair(dtype)`` gives both
    in ``dtype`` (fp64 copies are made once, on first use)."""

    def __init__(self, hf_class, directory, seed: int, decoder: bool = False, **config):
        transformers.logging.set_verbosity_error()
        hf = spread_(hf_class(hf_config(**config)), seed)
        if decoder:
            with torch.no_grad():
                hf.text_decoder.bert.embeddings.word_embeddings.weight[SEP] *= SEP_SCALE
                hf.text_decoder.cls.predictions.bias[SEP] += SEP_BIAS
        hf.save_pretrained(directory)
        self.models = {torch.float32: (hf, load_hf(directory).eval())}

    def __call__(self, dtype: torch.dtype = torch.float32):
        if dtype not in self.models:
            self.models[dtype] = tuple(copy.deepcopy(m).to(dtype) for m in self.models[torch.float32])
        return self.models[dtype]


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    return Pair(BlipForImageTextRetrieval, tmp_path_factory.mktemp("hf_retrieval"), seed=1)


@pytest.fixture(scope="module")
def caption(tmp_path_factory):
    return Pair(BlipForConditionalGeneration, tmp_path_factory.mktemp("hf_caption"), seed=2, decoder=True,
                image_size=96, vision_intermediate=128)


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    return Pair(BlipForQuestionAnswering, tmp_path_factory.mktemp("hf_vqa"), seed=3, decoder=True)


def images(batch: int, size: int = IMAGE, width: int | None = None, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, size, width or size).to(dtype)


def texts(word_counts: list[int], first: int = CLS) -> tuple[torch.Tensor, torch.Tensor]:
    """``first`` + random words + [SEP], padded with [PAD] to the longest: (ids, mask)."""
    length = max(word_counts) + 2
    ids = torch.full((len(word_counts), length), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, count in enumerate(word_counts):
        ids[row, 0] = first
        ids[row, 1:count + 1] = torch.randint(1000, 30000, (count,))
        ids[row, count + 1] = SEP
        mask[row, :count + 2] = 1
    return ids, mask


def with_first(ids: torch.Tensor, first: int) -> torch.Tensor:
    ids = ids.clone()
    ids[:, 0] = first
    return ids


# ------------------------------------------------------------------ image encoder


@DTYPES
@pytest.mark.parametrize("batch", [1, 3])
def test_vision_embeddings(retrieval, batch, dtype):
    hf, ours = retrieval(dtype)
    x = images(batch, dtype=dtype)
    with torch.no_grad():
        assert_close(ours.visual_encoder(x), hf.vision_model(pixel_values=x).last_hidden_state, "ViT tokens")


@DTYPES
@pytest.mark.parametrize("height, width", [(96, 96), (48, 48), (64, 96), (112, 32)])
def test_vision_embeddings_at_other_resolutions(retrieval, height, width, dtype):
    """Our ViT resamples its position embeddings for another grid as HF's ``interpolate_pos_encoding``."""
    hf, ours = retrieval(dtype)
    x = images(2, height, width, dtype=dtype)
    with torch.no_grad():
        theirs = hf.vision_model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        assert theirs.shape[1] == 1 + (height // 16) * (width // 16)
        assert_close(ours.visual_encoder(x), theirs, f"ViT tokens at {height}x{width}")


@DTYPES
@pytest.mark.parametrize("height, width", [(96, 96), (48, 48), (64, 96)])
def test_position_embedding_resampling(retrieval, height, width, dtype):
    """``position_embedding_for`` alone against HF's ``interpolate_pos_encoding`` (bicubic, [CLS] kept)."""
    hf, ours = retrieval(dtype)
    tokens = torch.zeros(1, 1 + (height // 16) * (width // 16), 64, dtype=dtype)
    with torch.no_grad():
        theirs = hf.vision_model.embeddings.interpolate_pos_encoding(tokens, height, width)
        mine = position_embedding_for(ours.visual_encoder.pos_embed, (height // 16, width // 16))
    assert mine.dtype == dtype, f"resampled position embeddings are {mine.dtype}, not {dtype}"
    assert_close(mine, theirs, f"position embeddings resampled to {height}x{width}")


# ------------------------------------------------------------------ retrieval: ITC and ITM


@DTYPES
@pytest.mark.parametrize("num_images, word_counts", [(1, [1]), (2, [1, 7, 13]), (4, [5, 0, 12, 3, 3])])
def test_itc_similarities(retrieval, num_images, word_counts, dtype):
    hf, ours = retrieval(dtype)
    x = images(num_images, dtype=dtype)
    ids, mask = texts(word_counts)
    with torch.no_grad():
        theirs = hf(input_ids=ids, pixel_values=x, attention_mask=mask, use_itm_head=False).itm_score
        mine = ours.similarity(ours.image_features(ours.image_embeds(x)), ours.text_features(ids, mask))
    assert theirs.shape == (num_images, len(word_counts))
    assert_close(mine, theirs, "ITC cosine similarities")


@DTYPES
@pytest.mark.parametrize("first", [ENC, CLS], ids=["enc", "cls"])
@pytest.mark.parametrize("word_counts", [[1], [1, 7, 13], [13, 0, 4, 13]])
def test_itm_logits(retrieval, first, word_counts, dtype):
    hf, ours = retrieval(dtype)
    x = images(len(word_counts), dtype=dtype)
    ids, mask = texts(word_counts, first)
    with torch.no_grad():
        theirs = hf(input_ids=ids, pixel_values=x, attention_mask=mask, use_itm_head=True).itm_score
        embeds = ours.image_embeds(x)
        assert_close(ours.itm_logits(embeds, ids, mask), theirs, f"ITM logits, first token {first}")
        if first == ENC:  # match_probability takes [CLS] captions and puts [ENC] first itself
            probability = ours.match_probability(embeds, with_first(ids, CLS), mask)  # always fp32
            assert_close(probability, theirs.float().softmax(-1)[:, 1], "ITM match probability")


def test_itm_padding_is_ignored(retrieval):
    """Extra [PAD] columns change neither HF's nor our ITM logits (guards the mask handling above)."""
    hf, ours = retrieval()
    x = images(2)
    ids, mask = texts([3, 6], ENC)
    padded_ids = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        embeds = ours.image_embeds(x)
        theirs = hf(input_ids=padded_ids, pixel_values=x, attention_mask=padded_mask).itm_score
        assert_close(ours.itm_logits(embeds, padded_ids, padded_mask), theirs, "ITM logits, padded")
        assert_close(ours.itm_logits(embeds, ids, mask), theirs, "ITM logits, unpadded vs padded")


# ------------------------------------------------------------------ captioning: LM logits and loss


@DTYPES
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("word_counts", [[1], [1, 7, 13], [4, 13, 0]])
def test_lm_logits_and_loss(caption, word_counts, label_smoothing, dtype):
    """HF's loss is the token mean of ``CrossEntropyLoss(label_smoothing)`` over ``logits[:, :-1]``
    against ``labels[:, 1:]``, -100 ignored; ours is ``text_decoder.loss`` on the same targets."""
    hf, ours = caption(dtype)
    x = images(len(word_counts), 96, dtype=dtype)
    ids, mask = texts(word_counts, DEC)
    targets = ids.masked_fill(mask == 0, -100)
    hf.text_decoder.label_smoothing = label_smoothing
    try:
        with torch.no_grad():
            out = hf(pixel_values=x, input_ids=ids, attention_mask=mask, labels=targets)
            embeds = ours.image_embeds(x)
            logits = ours.text_decoder.logits(ours.text_decoder.hidden_states(ids, mask, embeds))
            loss = ours.text_decoder.loss(ids, mask, embeds, None, targets, label_smoothing=label_smoothing)
    finally:
        hf.text_decoder.label_smoothing = 0.1
    assert_close(logits, out.logits, "LM logits")
    assert_close(loss, out.loss, f"LM loss (label smoothing {label_smoothing})")


@DTYPES
@pytest.mark.parametrize("prompt_length", [1, 4])
def test_caption_forward_loss(caption, prompt_length, dtype):
    """``BlipCaption.forward`` ([CLS] first, prompt masked) against HF's loss on the same targets."""
    hf, ours = caption(dtype)
    assert ours.config.label_smoothing == hf.text_decoder.label_smoothing == 0.1
    x = images(3, 96, dtype=dtype)
    ids, mask = texts([6, 13, 4])
    ids[:, 1:4] = torch.tensor([1037, 3861, 1997])  # "a picture of"
    dec_ids = with_first(ids, DEC)
    labels = dec_ids.masked_fill(mask == 0, -100)
    labels[:, :prompt_length] = -100
    with torch.no_grad():
        theirs = hf(pixel_values=x, input_ids=dec_ids, attention_mask=mask, labels=labels).loss
        mine = ours(x, ids, mask, prompt_length)
    assert_close(mine, theirs, f"caption loss, prompt length {prompt_length}")


# ------------------------------------------------------------------ captioning: generation


def hf_caption(hf, x, prompt, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return hf.generate(pixel_values=x, input_ids=prompt.clone(), do_sample=False, **kwargs)


def our_caption(ours, x, prompt, **kwargs) -> torch.Tensor:
    return ours.generate(x, prompt[:, :-1], GenerationConfig(**kwargs))


def hf_beam_fill_to_pad(tokens: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """HF 5.x beam search fills after the final [SEP] with [SEP]; map that fill to [PAD]."""
    generated = tokens[:, prompt_length:]
    is_sep = (generated == SEP).long()
    after_first_sep = is_sep.cumsum(dim=1) - is_sep > 0
    out = tokens.clone()
    out[:, prompt_length:] = generated.masked_fill(after_first_sep, PAD)
    return out


def caption_prompt(batch: int, words: list[int]) -> torch.Tensor:
    return torch.tensor([[CLS, *words, SEP]]).repeat(batch, 1)


def assert_ends_vary(tokens: torch.Tensor, prompt_length: int) -> None:
    """A generation case tests the stopping rules only if rows stop at different steps, some before
    the last one (a row that never emits [SEP] stops at ``tokens.shape[1]``)."""
    generated = tokens[:, prompt_length:] == SEP
    ends = torch.where(generated.any(dim=1), generated.int().argmax(dim=1), generated.shape[1])
    assert len(set(ends.tolist())) > 1, f"choose SEP_SCALE / SEP_BIAS again, every row ends alike:\n{tokens}"


@pytest.mark.parametrize(
    "batch, words, max_length, min_length, repetition_penalty",
    [(1, [], 12, 0, 1.0), (6, [1037, 3861, 1997], 16, 0, 1.0), (5, [1037, 3861, 1997], 14, 9, 1.0),
     (5, [1037], 13, 5, 1.5)],
    ids=["no-prompt", "prompt", "min-length", "repetition-penalty"],
)
def test_greedy_captions(caption, batch, words, max_length, min_length, repetition_penalty):
    hf, ours = caption()
    x = images(batch, 96)
    prompt = caption_prompt(batch, words)
    theirs = hf_caption(hf, x, prompt, max_length=max_length, min_length=min_length, num_beams=1,
                        repetition_penalty=repetition_penalty)
    mine = our_caption(ours, x, prompt, strategy="greedy", max_length=max_length, min_length=min_length,
                       repetition_penalty=repetition_penalty)
    assert_same_tokens(mine, theirs, "greedy captions")
    assert (theirs[:, :len(words) + 1] == with_first(prompt[:, :-1], DEC)).all()
    ends = (theirs == SEP).nonzero()[:, 1]
    assert (ends >= min_length - 1).all(), "min_length not in force"
    if batch > 1:
        assert_ends_vary(theirs, len(words) + 1)


@pytest.mark.parametrize(
    "words, max_length, min_length, length_penalty",
    [([1037], 14, 0, 1.0), ([], 12, 6, 1.0), ([1037, 3861, 1997], 13, 0, 0.5)],
    ids=["prompt", "min-length", "length-penalty"],
)
def test_beam_search_captions(caption, words, max_length, min_length, length_penalty):
    hf, ours = caption()
    x = images(5, 96)
    prompt = caption_prompt(5, words)
    theirs = hf_caption(hf, x, prompt, max_length=max_length, min_length=min_length, num_beams=3,
                        length_penalty=length_penalty)
    mine = our_caption(ours, x, prompt, strategy="beam", num_beams=3, max_length=max_length,
                       min_length=min_length, length_penalty=length_penalty)
    assert_ends_vary(theirs, len(words) + 1)
    assert_same_tokens(mine, hf_beam_fill_to_pad(theirs, len(words) + 1), "beam search captions")
    ends = (theirs == SEP).nonzero()[:, 1]
    assert (ends >= min_length - 1).all(), "min_length not in force"


def test_hf_beam_search_fills_with_sep(caption):
    """Documents the one beam-search difference tolerated above: HF 5.x fills the rest of a caption
    that ended before the longest with [SEP], we with [PAD]. If this starts failing, HF has changed
    and ``hf_beam_fill_to_pad`` can go."""
    hf, ours = caption()
    x = images(5, 96)
    prompt = caption_prompt(5, [1037])
    theirs = hf_caption(hf, x, prompt, max_length=14, min_length=0, num_beams=3)
    mine = our_caption(ours, x, prompt, strategy="beam", num_beams=3, max_length=14, min_length=0)
    short = (theirs == SEP).sum(dim=1) > 1
    assert short.any(), f"no caption ended before the longest:\n{theirs}"
    assert (theirs[short, -1] == SEP).all() and (mine[short, -1] == PAD).all()


# ------------------------------------------------------------------ VQA


@DTYPES
def test_vqa_question_states(vqa, dtype):
    hf, ours = vqa(dtype)
    x = images(3, dtype=dtype)
    ids, mask = texts([2, 9, 5])
    with torch.no_grad():
        image_embeds = hf.vision_model(pixel_values=x).last_hidden_state
        theirs = hf.text_encoder(input_ids=with_first(ids, ENC), attention_mask=mask,
                                 encoder_hidden_states=image_embeds).last_hidden_state
        assert_close(ours.question_states(x, ids, mask), theirs, "VQA question states")


@pytest.mark.parametrize("word_counts, num_beams", [([4], 1), ([2, 9, 5, 9, 1], 1), ([2, 9, 5, 9, 1], 3)])
def test_vqa_answers(vqa, word_counts, num_beams):
    """HF's VQA ``generate`` is greedy unless told otherwise; its decoder attends to every question
    position (padding too), as ours and the original."""
    hf, ours = vqa()
    x = images(len(word_counts))
    ids, mask = texts(word_counts)
    with torch.no_grad():
        theirs = hf.generate(input_ids=with_first(ids, ENC), pixel_values=x, attention_mask=mask,
                             max_length=8, min_length=1, num_beams=num_beams, do_sample=False)
    strategy = "greedy" if num_beams == 1 else "beam"
    mine = ours.generate(x, ids, mask, GenerationConfig(strategy=strategy, num_beams=num_beams, max_length=8,
                                                        min_length=1))
    if num_beams > 1:
        theirs = hf_beam_fill_to_pad(theirs, 1)
    assert_same_tokens(mine, theirs, f"VQA answers ({strategy})")
    assert (theirs[:, 0] == DEC).all()
    if len(word_counts) > 1:
        assert_ends_vary(theirs, 1)


@DTYPES
def test_vqa_training_loss(vqa, dtype):
    """Ours: ``sum_i w_i * (summed loss of answer i) / B`` over a padded batch; HF: the token mean of
    each answer alone, with its question unpadded (HF 5.x ignores the question padding mask, see
    ``test_hf_vqa_decoder_ignores_question_padding``)."""
    hf, ours = vqa(dtype)
    x = images(3, dtype=dtype)
    q_words = [5, 8, 3]
    q_ids, q_mask = texts(q_words)
    a_ids, a_mask = texts([1, 3, 2, 1], DEC)
    per_question = [2, 1, 1]
    weights = torch.tensor([0.7, 0.3, 1.0, 1.0], dtype=dtype)
    targets = a_ids.masked_fill(a_mask == 0, -100)
    question_of = torch.repeat_interleave(torch.arange(3), torch.tensor(per_question)).tolist()
    counts = (targets[:, 1:] != -100).sum(dim=1)
    with torch.no_grad():
        per_answer = torch.stack([
            hf(input_ids=with_first(q_ids[q:q + 1, :q_words[q] + 2], ENC), pixel_values=x[q:q + 1],
               attention_mask=q_mask[q:q + 1, :q_words[q] + 2], decoder_input_ids=a_ids[i:i + 1],
               decoder_attention_mask=a_mask[i:i + 1], labels=targets[i:i + 1]).loss
            for i, q in enumerate(question_of)
        ])
        mine = ours(x, q_ids, q_mask, a_ids, a_mask, weights, per_question)
    assert_close(mine, (weights * counts * per_answer).sum() / 3, "VQA weighted answer loss")


@DTYPES
def test_vqa_training_loss_unpadded_batch(vqa, dtype):
    """With equal-length questions HF's batched loss is comparable: its token mean is ours (weights 1)
    times ``B / number of answer tokens``."""
    hf, ours = vqa(dtype)
    x = images(3, dtype=dtype)
    q_ids, q_mask = texts([6, 6, 6])
    a_ids, a_mask = texts([1, 4, 2], DEC)
    targets = a_ids.masked_fill(a_mask == 0, -100)
    with torch.no_grad():
        theirs = hf(input_ids=with_first(q_ids, ENC), pixel_values=x, attention_mask=q_mask,
                    decoder_input_ids=a_ids, decoder_attention_mask=a_mask, labels=targets).loss
        mine = ours(x, q_ids, q_mask, a_ids, a_mask, torch.ones(3, dtype=dtype), [1, 1, 1])
    assert_close(mine * 3 / (targets[:, 1:] != -100).sum(), theirs, "VQA token-mean loss")


def test_hf_vqa_decoder_ignores_question_padding(vqa):
    """Documents an HF 5.x difference: ``BlipTextAttention`` passes the cross-attention mask as
    ``attention_mask`` and ``BlipTextSelfAttention`` then replaces it by its (unset)
    ``encoder_attention_mask``, so HF's answer decoder attends to padded question positions in
    training. Ours masks them, as the original ``blip_vqa.py`` (``encoder_attention_mask=question_atts``).
    If this starts failing, HF has fixed it: compare the padded batch loss directly."""
    hf, ours = vqa()
    states = torch.randn(2, 7, 64)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    a_ids, a_mask = texts([2, 3], DEC)
    with torch.no_grad():
        decoder = ours.text_decoder
        masked = hf.text_decoder(input_ids=a_ids, attention_mask=a_mask, encoder_hidden_states=states,
                                 encoder_attention_mask=mask).logits
        unmasked = hf.text_decoder(input_ids=a_ids, attention_mask=a_mask,
                                   encoder_hidden_states=states).logits
        ours_masked = decoder.logits(decoder.hidden_states(a_ids, a_mask, states, mask))
        ours_trimmed = decoder.logits(decoder.hidden_states(a_ids[:1], a_mask[:1], states[:1, :3]))
    assert torch.equal(masked, unmasked), "HF now applies the cross-attention mask"
    assert_close(ours_masked[1:], unmasked[1:], "decoder logits, unpadded question")
    assert_close(ours_masked[:1], ours_trimmed, "our decoder with a padded question vs the question trimmed")
    assert rel_err(ours_masked[:1], unmasked[:1]) > 1e-3
