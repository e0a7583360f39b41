"""The original BLIP's fine-tuning models (``blip-ci``, built by ``benchmarks/original_blip.py``) against ours.

Our task models' weights are loaded into the original's (the key names are the same), then both run on the same
images and text:

- captioning (``blip.BLIP_Decoder`` / :class:`BlipCaption`): the LM loss of prompt + caption and the gradient of
  every parameter; greedy captions token for token;
- retrieval (``blip_retrieval.BLIP_Retrieval`` / :class:`BlipRetrieval`): the ITC similarity matrix and the
  ITM-re-ranked score matrices of the original ``evaluation`` (``train_retrieval.py``, not packaged in blip-ci:
  transcribed below on the original's modules), the ITM match probability of image-caption pairs, and the
  fine-tuning step (ITC with image ids, ITM negatives with same-image pairs masked out, both drawing the hardest
  negative so that the draws agree): losses, gradients and the queues with their image ids;
- VQA (``blip_vqa.BLIP_VQA`` / :class:`BlipVQA`): the weighted answer loss and every gradient; greedy answers; the
  answers picked from a list (``inference='rank'``), with the list tokenized as the original's evaluation does;
- NLVR2 (``blip_nlvr.BLIP_NLVR`` / :class:`BlipNLVR`): the loss of a batch of statements about image pairs, every
  gradient (the learned merge of the two images' branches included) and the logits.

transformers 5's ``PreTrainedModel`` no longer has ``generate``, so the original's ``generate`` (beam search,
nucleus sampling) cannot run; greedy decoding is compared instead, the original's decoder run over the whole
sequence at every step (no cache) with transformers 4.15's greedy rules (:func:`original_greedy`).

Tolerances, fp32: losses 1e-5 relative (seen: equal); gradients within 1e-4 of each tensor's largest
gradient (seen: below 2e-6); ITC similarities and ITM scores 1e-5 absolute (seen: below 3e-7); decoded tokens
equal. The models: ViT-B/16 at 32 px and a 2-layer, 64-wide text transformer (8 layers for NLVR2, whose layers
from the 7th on merge the two images with a learned layer), dropout 0; VQA and NLVR2 build their ViT with
drop-path 0.1 as the original does, so VQA is compared in eval mode.

Skipped without blip-ci (``pip install --no-deps blip-ci==0.0.5``), failed with ``BLIP_FAST_REQUIRE_ORIGINAL=1``.
"""


import pytest
import torch
import torch.nn.functional as F
from original_checks import CAPTIONS, assert_same_gradients, needs_original, original_blip, small_config

from blip_fast.config import preset
from blip_fast.evaluation.retrieval import retrieval_scores
from blip_fast.models import BlipCaption, BlipNLVR, BlipRetrieval, BlipVQA, GenerationConfig
from blip_fast.models.blip_vqa import tokenize_answer_list
from blip_fast.text import BlipTokenizer

QUESTIONS = ["what colour is the cube?", "how many balls are there?"]
ANSWERS = ["red", "dark red", "two"]  # question 0 has two answers, question 1 one
ANSWERS_PER_QUESTION = [2, 1]
SEP, PAD = 102, 0


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def images(batch, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def loaded_pair(ours, build, text_modules):
    """(ours, the original from ``build``) with our weights, in our model's train/eval mode; the original's only
    extra keys are BERT's position_ids buffers of ``text_modules``."""
    original = build(ours.config).train(ours.training)
    missing, unexpected = original.load_state_dict(ours.state_dict(), strict=False)
    assert unexpected == []
    assert sorted(missing) == sorted(f"{m}.embeddings.position_ids" for m in text_modules)
    return ours, original


@torch.no_grad()
def original_greedy(decoder, ids, context, max_length, min_length):
    """transformers 4.15's ``greedy_search`` on the original ``BertLMHeadModel``, which is what its ``generate``
    did with one beam and no sampling: [SEP] forbidden below ``min_length`` tokens (prompt included), a row that
    produced [SEP] continues with [PAD], the batch stops when every row has ended or at ``max_length``. Without a
    cache: the whole sequence each step, attending to every context position (the original's mask of ones)."""
    context_mask = torch.ones(context.shape[:-1], dtype=torch.long)
    running = torch.ones(ids.shape[0], dtype=torch.bool)
    while ids.shape[1] < max_length:
        scores = decoder(ids, encoder_hidden_states=context, encoder_attention_mask=context_mask,
                         return_dict=True).logits[:, -1]  # (B, V)
        if ids.shape[1] < min_length:
            scores[:, SEP] = float("-inf")
        next_ids = torch.where(running, scores.argmax(dim=-1), PAD)
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
        running &= next_ids != SEP
        if not running.any():
            break
    return ids


# ---------------------------------------------------------------- captioning


@pytest.fixture(scope="module")
def captioners():
    torch.manual_seed(0)
    return loaded_pair(BlipCaption(small_config()).train(), original_blip.build_original_caption,
                       ["text_decoder.bert"])


@needs_original
def test_caption_lm_loss_and_gradients_match(captioners):
    ours, original = captioners
    texts = [original.prompt + caption for caption in CAPTIONS[:3]]  # the dataset prepends the prompt
    tokens = BlipTokenizer()(texts, max_length=40, padding="longest")  # as BLIP_Decoder.forward tokenizes
    prompt_length = BlipTokenizer()([original.prompt]).input_ids.shape[1] - 1  # [CLS] + prompt, as the original
    assert prompt_length == original.prompt_length == 4
    pixels = images(3)
    our_loss = ours(pixels, tokens.input_ids, tokens.attention_mask, prompt_length)
    original_loss = original(pixels, texts)
    torch.testing.assert_close(our_loss, original_loss.detach(), rtol=1e-5, atol=0)
    our_loss.backward()
    original_loss.backward()
    assert_same_gradients(ours, original)


@needs_original
def test_caption_greedy_tokens_match(captioners):
    ours, original = (model.eval() for model in captioners)
    pixels = images(2, seed=2)
    prompt_ids = BlipTokenizer()([ours.config.prompt] * 2).input_ids[:, :-1]  # [CLS] + prompt, no [SEP]
    generation = GenerationConfig(strategy="greedy", max_length=12, min_length=8)
    our_ids = ours.generate(pixels, prompt_ids, generation)
    start = prompt_ids.clone()
    start[:, 0] = original.tokenizer.bos_token_id
    with torch.no_grad():
        context = original.visual_encoder(pixels)
    original_ids = original_greedy(original.text_decoder, start, context, generation.max_length,
                                   generation.min_length)
    assert torch.equal(our_ids, original_ids)


# ---------------------------------------------------------------- retrieval


@pytest.fixture(scope="module")
def retrievers():
    torch.manual_seed(0)
    return loaded_pair(BlipRetrieval(small_config()).eval(), original_blip.build_original_retrieval,
                       ["text_encoder", "text_encoder_m"])


@torch.no_grad()
def original_retrieval_scores(model, pixels, captions, k):
    """``evaluation`` of the original ``train_retrieval.py`` (batching aside): ITC similarities, then for each
    image its top-k captions and for each caption its top-k images scored ``itm_logit[:, 1] + similarity``,
    every other entry -100. Returns (sims, score_i2t, score_t2i)."""
    text = model.tokenizer(captions, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    text_output = model.text_encoder(text.input_ids, attention_mask=text.attention_mask, return_dict=True, mode="text")
    text_embeds = F.normalize(model.text_proj(text_output.last_hidden_state[:, 0, :]))
    text_ids = text.input_ids.clone()
    text_ids[:, 0] = model.tokenizer.enc_token_id
    image_feats = model.visual_encoder(pixels)
    image_embeds = F.normalize(model.vision_proj(image_feats[:, 0, :]), dim=-1)
    sims_matrix = image_embeds @ text_embeds.t()

    def itm(ids, atts, encoder_output):
        encoder_att = torch.ones(encoder_output.size()[:-1], dtype=torch.long)
        output = model.text_encoder(ids, attention_mask=atts, encoder_hidden_states=encoder_output,
                                    encoder_attention_mask=encoder_att, return_dict=True)
        return model.itm_head(output.last_hidden_state[:, 0, :])[:, 1]

    score_i2t = torch.full_like(sims_matrix, -100.0)
    for i, sims in enumerate(sims_matrix):
        topk_sim, topk_idx = sims.topk(k=k, dim=0)
        score_i2t[i, topk_idx] = itm(text_ids[topk_idx], text.attention_mask[topk_idx],
                                     image_feats[i].repeat(k, 1, 1)) + topk_sim
    score_t2i = torch.full_like(sims_matrix.t(), -100.0)
    for t, sims in enumerate(sims_matrix.t()):
        topk_sim, topk_idx = sims.topk(k=k, dim=0)
        score_t2i[t, topk_idx] = itm(text_ids[t].repeat(k, 1), text.attention_mask[t].repeat(k, 1),
                                     image_feats[topk_idx]) + topk_sim
    return sims_matrix, score_i2t, score_t2i


@needs_original
def test_retrieval_similarities_and_itm_scores_match(retrievers):
    ours, original = retrievers
    pixels = images(3)
    tokens = BlipTokenizer()(CAPTIONS, max_length=35, padding="max_length")
    sims, score_i2t, score_t2i = original_retrieval_scores(original, pixels, CAPTIONS, k=2)
    our_sims, _ = retrieval_scores(ours, pixels, tokens.input_ids, tokens.attention_mask, itm_k=0)
    our_i2t, our_t2i = retrieval_scores(ours, pixels, tokens.input_ids, tokens.attention_mask, itm_k=2)
    torch.testing.assert_close(our_sims, sims, rtol=0, atol=1e-5)
    torch.testing.assert_close(our_i2t, score_i2t, rtol=0, atol=1e-5)
    torch.testing.assert_close(our_t2i, score_t2i, rtol=0, atol=1e-5)


@needs_original
def test_retrieval_match_probability_matches(retrievers):
    ours, original = retrievers
    pixels = images(3)
    tokens = BlipTokenizer()(CAPTIONS[:3], max_length=35, padding="max_length")
    with torch.no_grad():
        embeds = original.visual_encoder(pixels)
        ids = tokens.input_ids.clone()
        ids[:, 0] = original.tokenizer.enc_token_id
        output = original.text_encoder(ids, attention_mask=tokens.attention_mask, encoder_hidden_states=embeds,
                                       encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long),
                                       return_dict=True)
        expected = original.itm_head(output.last_hidden_state[:, 0, :]).softmax(dim=-1)[:, 1]
        probability = ours.match_probability(ours.image_embeds(pixels), tokens.input_ids, tokens.attention_mask)
    torch.testing.assert_close(probability, expected, rtol=0, atol=1e-5)


def hardest_negative(weights, num_samples, generator=None, **_):
    """``torch.multinomial`` made deterministic for a comparison: the most probable column (rows of a 2-D input)."""
    assert num_samples == 1
    return weights.argmax(dim=-1, keepdim=True)


@needs_original
def test_retrieval_finetuning_losses_gradients_and_queues_match(monkeypatch):
    torch.manual_seed(0)
    config = small_config()
    config.queue_size = 12  # the original's enqueue needs a multiple of the batch of 6
    ours = BlipRetrieval(config).train()
    ours, original = loaded_pair(ours, original_blip.build_original_retrieval, ["text_encoder", "text_encoder_m"])
    # two captions of image 1 (positives of each other in ITC, never each other's ITM negatives) and of image 2
    idx = torch.tensor([0, 1, 1, 2, 2, 3])
    captions = CAPTIONS + ["a small grey cube", "three spheres in a row"]
    tokens = BlipTokenizer()(captions, max_length=35, padding="max_length")  # as BLIP_Retrieval.forward tokenizes
    pixels = images(6)
    monkeypatch.setattr(torch, "multinomial", hardest_negative)  # both sides draw the hardest negative
    losses = ours(pixels, tokens.input_ids, tokens.attention_mask, idx, alpha=0.4)
    loss_ita, loss_itm = original(pixels, captions, 0.4, idx)
    torch.testing.assert_close(losses["itc"], loss_ita.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(losses["itm"], loss_itm.detach(), rtol=1e-5, atol=0)
    (losses["itc"] + losses["itm"]).backward()
    (loss_ita + loss_itm).backward()
    assert_same_gradients(ours, original)
    for name in ("image_queue", "text_queue", "idx_queue", "ptr_queue"):
        torch.testing.assert_close(getattr(ours, name), getattr(original, name), rtol=0, atol=1e-6, msg=name)
    assert torch.equal(ours.idx_queue[0, :6], idx)


# ---------------------------------------------------------------- VQA


@pytest.fixture(scope="module")
def vqa_models():
    torch.manual_seed(0)
    # eval mode: both ViTs have the original's drop-path 0.1, which would drop different samples in training
    return loaded_pair(BlipVQA(small_config(drop_path_rate=0.1)).eval(), original_blip.build_original_vqa,
                       ["text_encoder", "text_decoder.bert"])


@needs_original
def test_vqa_answer_loss_and_gradients_match(vqa_models):
    ours, original = vqa_models
    pixels = images(2)
    weights = torch.tensor([0.75, 0.25, 1.0])
    questions = BlipTokenizer()(QUESTIONS, max_length=35, padding="longest")  # as BLIP_VQA.forward tokenizes
    answers = BlipTokenizer()(ANSWERS, max_length=35, padding="longest")
    our_loss = ours(pixels, questions.input_ids, questions.attention_mask, answers.input_ids,
                    answers.attention_mask, weights, ANSWERS_PER_QUESTION)
    original_loss = original(pixels, QUESTIONS, ANSWERS, n=ANSWERS_PER_QUESTION, weights=weights, train=True)
    torch.testing.assert_close(our_loss, original_loss.detach(), rtol=1e-5, atol=0)
    our_loss.backward()
    original_loss.backward()
    assert_same_gradients(ours, original)


@needs_original
def test_vqa_greedy_answers_match(vqa_models):
    ours, original = vqa_models
    pixels = images(2, seed=2)
    questions = BlipTokenizer()(QUESTIONS, max_length=35, padding="longest")
    generation = GenerationConfig(strategy="greedy", max_length=6, min_length=1)  # the original: 10 and 1
    our_ids = ours.generate(pixels, questions.input_ids, questions.attention_mask, generation)
    with torch.no_grad():  # BLIP_VQA.forward(train=False) up to its generate call
        embeds = original.visual_encoder(pixels)
        ids = questions.input_ids.clone()
        ids[:, 0] = original.tokenizer.enc_token_id
        states = original.text_encoder(ids, attention_mask=questions.attention_mask, encoder_hidden_states=embeds,
                                       encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long),
                                       return_dict=True).last_hidden_state
    start = torch.full((2, 1), original.tokenizer.bos_token_id)
    original_ids = original_greedy(original.text_decoder, start, states, generation.max_length,
                                   generation.min_length)
    assert torch.equal(our_ids, original_ids)


# candidates of different lengths, some sharing a first token ("dark ..."), so that the first-token shortlist and
# the whole-answer score can disagree
ANSWER_LIST = ["red", "dark red", "two", "dark blue", "a big red ball", "yes", "no", "blue"]


@pytest.fixture(scope="module")
def vqa_ranking_models():
    torch.manual_seed(0)
    ours = BlipVQA(small_config(drop_path_rate=0.1)).eval()
    # the decoder's matrices drawn wider than BERT's init (std 0.02), under which every question gets nearly the
    # same first-token distribution: here the shortlists differ between questions and follow their padding mask
    with torch.no_grad():
        for name, weight in ours.text_decoder.named_parameters():
            if weight.dim() == 2 and "word_embeddings" not in name:
                weight.normal_(0, 0.1)
    return loaded_pair(ours, original_blip.build_original_vqa, ["text_encoder", "text_decoder.bert"])


@needs_original
@pytest.mark.parametrize("k", [3, len(ANSWER_LIST)])
def test_vqa_ranked_answers_match(vqa_ranking_models, k):
    ours, original = vqa_ranking_models
    pixels = images(4, seed=3)
    # a long question, so that the others' padding is long
    questions = QUESTIONS + ["is the ball red?", "what is on the left of the small green ball next to the big cube?"]
    tokens = BlipTokenizer()(questions, max_length=35, padding="longest")
    # the original's evaluation (train_vqa.py): the answer list padded to the longest, [DEC] first
    candidates = original.tokenizer(ANSWER_LIST, padding="longest", return_tensors="pt")
    candidates.input_ids[:, 0] = original.tokenizer.bos_token_id
    answers = tokenize_answer_list(ANSWER_LIST, ours.config.text.max_position_embeddings)
    assert torch.equal(answers.input_ids, candidates.input_ids)
    assert torch.equal(answers.attention_mask, candidates.attention_mask)

    # rank_answer returns only the pick: its shortlist and scores are read off its decoder's call with labels
    scored = []

    def keep_scored(module, args, kwargs, output):
        if kwargs.get("labels") is not None:
            scored.append((args[0], -output.loss))

    hook = original.text_decoder.register_forward_hook(keep_scored, with_kwargs=True)
    try:
        with torch.no_grad():
            original_picked = original(pixels, questions, candidates, train=False, inference="rank", k_test=k)
    finally:
        hook.remove()
    (rows, original_scores), = scored
    original_shortlist = (rows[:, None] == candidates.input_ids[None]).all(dim=-1).float().argmax(dim=1)

    def by_answer(shortlist, scores):
        # answers that share a first token ("dark ...") tie in probability: compare shortlists in answer order
        shortlist, order = shortlist.view(len(questions), k).sort(dim=1)
        return shortlist, scores.view(len(questions), k).gather(1, order)

    ours_shortlist, ours_scores = by_answer(*ours.score_answers(pixels, tokens.input_ids, tokens.attention_mask,
                                                                answers.input_ids, answers.attention_mask, k))
    original_shortlist, original_scores = by_answer(original_shortlist, original_scores)
    assert torch.equal(ours_shortlist, original_shortlist)
    torch.testing.assert_close(ours_scores, original_scores, rtol=1e-5, atol=1e-5)
    picked = ours.rank_answers(pixels, tokens.input_ids, tokens.attention_mask, answers.input_ids,
                               answers.attention_mask, k)
    assert torch.equal(picked, original_picked)
    # scored in passes of one question, the picks are the same
    assert torch.equal(ours.rank_answers(pixels, tokens.input_ids, tokens.attention_mask, answers.input_ids,
                                         answers.attention_mask, k, max_rows=1), picked)


# ---------------------------------------------------------------- NLVR2


@pytest.fixture(scope="module")
def nlvr_models():
    torch.manual_seed(0)
    # 8 layers: the original merges the two images' branches with a learned layer from the 7th on; eval mode, as
    # the ViT's drop-path 0.1 draws at random in training (the text has no dropout here)
    return loaded_pair(BlipNLVR(small_config(drop_path_rate=0.1, text_layers=8)).eval(),
                       original_blip.build_original_nlvr, ["text_encoder"])


@needs_original
def test_nlvr_loss_logits_and_gradients_match(nlvr_models):
    ours, original = nlvr_models
    layers = ours.text_encoder.encoder.layer
    assert not hasattr(layers[5].crossattention.output, "merge_layer")
    assert original.text_encoder.encoder.layer[6].crossattention.output.merge
    pixels = images(6)  # every pair's first image, then every pair's second image
    sentences = ["the left image has more cubes", "both images show a sphere", "a red ball"]
    targets = torch.tensor([1, 0, 1])
    tokens = BlipTokenizer()(sentences, max_length=40, padding="longest")  # as BLIP_NLVR.forward tokenizes
    our_loss = ours(pixels, tokens.input_ids, tokens.attention_mask, targets)
    original_loss = original(pixels, sentences, targets, train=True)
    torch.testing.assert_close(our_loss, original_loss.detach(), rtol=1e-5, atol=0)
    our_loss.backward()
    original_loss.backward()
    assert_same_gradients(ours, original)
    assert layers[6].crossattention.output.merge_layer.weight.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(pixels, tokens.input_ids, tokens.attention_mask),
                                   original(pixels, sentences, targets, train=False), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- without the original


def test_builders_refuse_a_drop_path_the_original_does_not_build():
    with pytest.raises(ValueError, match="has drop-path 0.1; the config says 0.0"):
        original_blip._check_drop_path(small_config(), "base", 0.1)  # VQA and NLVR2
    with pytest.raises(ValueError, match="has drop-path 0.0; the config says 0.1"):
        original_blip._check_drop_path(small_config(drop_path_rate=0.1), "base", 0.0)
    original_blip._check_drop_path(preset("large"), "large", 0.0)  # ViT-L: 0.1 whatever is asked


def test_unknown_original_module_is_refused():
    with pytest.raises(ValueError, match="no model module 'blip_itm'"):
        original_blip.load_original_module("blip_itm")
