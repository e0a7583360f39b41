"""CapFilt's two models at work (BLIP paper, section 3.3): the captioner writes synthetic captions, the filter
scores every (image, text) pair.

* **Captioner**: the image-grounded text decoder fine-tuned for captioning (a ``caption`` checkpoint) samples
  captions by nucleus sampling, as the original ``BLIP_Decoder.generate(sample=True)``: top-p 0.9 (after the top-k
  50 Hugging Face's ``generate`` applies by default), repetition penalty 1.1, from the prompt "a picture of ", 10 to
  30 tokens counting the prompt (``generate``'s defaults). The paper samples rather than beam-searches because
  diverse captions help pretraining more than safe ones.
* **Filter**: the image-grounded text encoder fine-tuned for retrieval (a ``retrieval`` checkpoint; a ``pretrain``
  one works too) gives each pair an ITM match probability, the softmax of its ITM head's two logits; a text is
  noise where ITM says "no match" (probability of a match below 0.5: the author's answer in BLIP issues #46 and
  #54). The ITC cosine similarity of the pair is computed on the way, for the record.

An image's texts share its cross-attention keys/values: computed once per image, and where every image of a batch
has the same number of texts (one web caption and N synthetic ones), stacked along the sequence against them
(:class:`~blip_fast.models.fast_passes.BlockContext`) instead of copied per text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from ..models.fast_passes import BlockContext
from ..models.generation import GenerationConfig
from ..text import BlipTokenizer, clean_caption

# the original BLIP_Decoder.generate(sample=True) with its default lengths; top_k 50 is what Hugging Face's
# generate added without being asked, and repetition_penalty 1.1 is hard-coded there for sampling
CAPFILT_GENERATION = GenerationConfig(strategy="nucleus", max_length=30, min_length=10, top_k=50, top_p=0.9,
                                      repetition_penalty=1.1)
FILTER_TASKS = ("retrieval", "pretrain")
TEXT_MAX_TOKENS = 35  # the retrieval model's text length (the original's max_length=35 in its ITM and ITC)


@torch.no_grad()
def synthetic_captions(model, images: torch.Tensor, per_image: int, tokenizer: BlipTokenizer,
                       generation: GenerationConfig = CAPFILT_GENERATION,
                       generator: torch.Generator | None = None) -> list[list[str]]:
    """``per_image`` sampled captions for each of ``images`` (B, 3, S, S) from ``model`` (a
    :class:`~blip_fast.models.BlipCaption` in eval mode), as a list per image: independent draws
    (``num_return_sequences``: the ViT runs once per image and the image's keys/values serve all its draws);
    ``generator`` makes them reproducible."""
    if per_image < 1:
        raise ValueError(f"captions per image must be at least 1; got {per_image}")
    if getattr(model, "task", None) != "caption":
        raise ValueError(f"the captioner must be a caption model; got a {getattr(model, 'task', type(model))} model")
    texts = model.captions(images, replace(generation, num_return_sequences=per_image), tokenizer, generator)
    return [texts[i * per_image:(i + 1) * per_image] for i in range(images.shape[0])]


@torch.no_grad()
def filter_pairs(model, images: torch.Tensor, texts: Sequence[Sequence[str]], batch_size: int = 64,
                 tokenizer: BlipTokenizer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM match probability and ITC cosine similarity of every pair (image i, each text of ``texts[i]``).

    ``model`` is a retrieval or pretraining model (eval mode), ``images`` (I, 3, S, S) normalised pixels at its size.
    Texts are cleaned as the original's ``pre_caption`` and cut to 35 tokens, as :meth:`blip_fast.Blip.match` and
    :meth:`~blip_fast.Blip.similarity` do; a text left empty by cleaning is a ValueError (it says nothing to score).
    ``batch_size`` images go through the ViT at once, with all their texts. Returns two float32 tensors (P,) on the
    CPU, P the number of texts, in order image by image.
    """
    if getattr(model, "task", None) not in FILTER_TASKS:
        raise ValueError(f"the filter must be a retrieval or pretrain model; got a "
                         f"{getattr(model, 'task', type(model).__name__)} model")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    if len(texts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(texts)} lists of texts: one list per image")
    tokenizer = tokenizer or BlipTokenizer()
    device = next(model.parameters()).device
    itm, itc = [], []
    for start in range(0, images.shape[0], batch_size):
        chunk = [list(t) for t in texts[start:start + batch_size]]
        if not any(chunk):
            continue
        pixels = images[start:start + batch_size].to(device)
        prob, sim = _score_chunk(model, pixels, chunk, tokenizer, start)
        itm.append(prob)
        itc.append(sim)
    if not itm:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(itm), torch.cat(itc)


def _score_chunk(model, pixels, texts: list[list[str]], tokenizer, first: int):
    counts = [len(t) for t in texts]
    uniform = len(set(counts)) == 1
    # a uniform chunk is scored slot by slot (every image's first text, then every image's second, ...), the
    # order in which BlockContext stacks an image's rows against its keys/values
    if uniform:
        order = [(i, j) for j in range(counts[0]) for i in range(len(texts))]
    else:
        order = [(i, j) for i, row in enumerate(texts) for j in range(len(row))]
    cleaned = []
    for i, j in order:
        text = clean_caption(texts[i][j])
        if not text:
            raise ValueError(f"text {j} of image {first + i} ({texts[i][j]!r}) is empty after cleaning")
        cleaned.append(text)
    tokens = tokenizer(cleaned, max_length=TEXT_MAX_TOKENS)
    ids, mask = tokens.input_ids.to(pixels.device), tokens.attention_mask.to(pixels.device)
    rows = torch.tensor([i for i, _ in order], device=pixels.device)

    image_embeds = model.image_embeds(pixels)
    image_feat = model.image_features(image_embeds)
    text_feat = model.text_features(ids, mask)
    similarity = (image_feat[rows] * text_feat).sum(dim=-1)

    keys_values = model.image_keys_values(image_embeds)
    if uniform:
        contexts = [BlockContext(((k, v, counts[0], None),)) for k, v in keys_values]
    else:  # rows of different images take their keys/values by index
        contexts = [(k[rows], v[rows]) for k, v in keys_values]
    logits = model.itm_logits_from_keys_values(contexts, model.with_enc(ids), mask)
    probability = logits.float().softmax(dim=-1)[:, 1]

    # back to image-by-image order
    position = {pair: n for n, pair in enumerate(order)}
    back = torch.tensor([position[(i, j)] for i, row in enumerate(texts) for j in range(len(row))],
                        device=pixels.device)
    return probability[back].cpu(), similarity[back].float().cpu()
