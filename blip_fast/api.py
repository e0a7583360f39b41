"""The public API: load a checkpoint, then embed, score, caption and answer.

    import blip_fast
    blip = blip_fast.load("model_base_caption_capfilt_large.pth")   # or a Hugging Face directory
    blip.caption(["cat.jpg"])                                          # ['a cat sitting on a couch']

Images are file paths, PIL images, or normalised (B, 3, H, W) tensors; texts are strings. Each
method checks that the loaded model can do it (a captioner has no ITM head) and says so.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import nn

from .checkpoint import load_checkpoint
from .images import to_batch
from .models import GenerationConfig
from .models.compile import compile_blocks
from .text import BlipTokenizer, clean_caption, clean_question

_CAPABILITIES = {
    "embed": ("pretrain", "retrieval"),
    "match": ("pretrain", "retrieval"),
    "caption": ("caption",),
    "answer": ("vqa",),
}


class Blip:
    """A loaded BLIP model with its tokenizer and image transform."""

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 compile: bool = False):
        self.model = model.to(device=device, dtype=dtype).eval()
        if compile:
            compile_blocks(self.model)
        self.device = torch.device(device)
        self.dtype = dtype
        self.tokenizer = BlipTokenizer()
        self.task = model.task
        self.image_size = model.config.vision.image_size

    def _require(self, capability: str) -> None:
        if self.task not in _CAPABILITIES[capability]:
            raise ValueError(f"a {self.task} model cannot {capability}; load a "
                             f"{' or '.join(_CAPABILITIES[capability])} checkpoint")

    def _images(self, images) -> torch.Tensor:
        return to_batch(images, self.image_size).to(self.device, self.dtype)

    def _texts(self, texts, max_length: int, clean=clean_caption):
        if isinstance(texts, str):
            texts = [texts]
        texts = [clean(t) for t in texts]
        if not texts:
            raise ValueError("no texts given")
        empty = [i for i, t in enumerate(texts) if not t]
        if empty:
            raise ValueError(f"text(s) at position {empty} are empty after cleaning")
        tokens = self.tokenizer(texts, max_length=max_length)
        return tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        """Normalised ITC image features (B, embed_dim)."""
        self._require("embed")
        return self.model.image_features(self.model.image_embeds(self._images(images))).float()

    @torch.no_grad()
    def embed_texts(self, texts, max_length: int = 35) -> torch.Tensor:
        """Normalised ITC text features (B, embed_dim)."""
        self._require("embed")
        return self.model.text_features(*self._texts(texts, max_length)).float()

    @torch.no_grad()
    def similarity(self, images, texts) -> torch.Tensor:
        """ITC cosine similarities (num_images, num_texts)."""
        return self.embed_images(images) @ self.embed_texts(texts).t()

    @torch.no_grad()
    def match(self, images, texts, max_length: int = 35) -> torch.Tensor:
        """ITM probability (B,) that image i and text i match (one text per image)."""
        self._require("match")
        pixels = self._images(images)
        ids, mask = self._texts(texts, max_length)
        if ids.shape[0] != pixels.shape[0]:
            raise ValueError(f"match pairs image i with text i: got {pixels.shape[0]} images, {ids.shape[0]} texts")
        logits = self.model.itm_logits(self.model.image_embeds(pixels), self.model.with_enc(ids), mask)
        return logits.float().softmax(dim=-1)[:, 1]

    @torch.no_grad()
    def caption(self, images, strategy: str = "beam", max_length: int = 30, min_length: int = 10,
                num_beams: int = 3, top_p: float = 0.9, repetition_penalty: float | None = None,
                seed: int | None = None, top_k: int = 50, num_return_sequences: int = 1, batch_size: int = 64,
                progress: bool = False) -> list[str]:
        """Captions, decoded after the prompt ("a picture of "), as the original ``generate``.

        BLIP's defaults: beam search with 3 beams and repetition penalty 1.0, or nucleus sampling
        with top-k 50, then top-p 0.9, and repetition penalty 1.1. ``max_length`` and
        ``min_length`` count the prompt's tokens ([DEC] included). ``num_return_sequences`` (nucleus):
        captions per image, image by image. Images are read and captioned ``batch_size`` at a time;
        ``progress`` shows a progress bar (images/s) on stderr.
        """
        self._require("caption")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
        if repetition_penalty is None:
            repetition_penalty = 1.1 if strategy == "nucleus" else 1.0
        config = GenerationConfig(strategy=strategy, max_length=max_length, min_length=min_length,
                                  num_beams=num_beams, top_k=top_k, top_p=top_p,
                                  repetition_penalty=repetition_penalty, num_return_sequences=num_return_sequences)
        self.model.prompt_ids(self.tokenizer, config)  # a max_length too short for the prompt: before any image is read
        if not isinstance(images, torch.Tensor):  # a list to take chunks of: paths or PIL images
            images = [images] if isinstance(images, (str, Path, Image.Image)) else list(images)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(images), unit="image", dynamic_ncols=True)
        captions = []
        try:
            for start in range(0, len(images), batch_size):
                chunk = images[start:start + batch_size]
                captions += self.model.captions(self._images(chunk), config, self.tokenizer, generator)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        if not captions:
            raise ValueError("no images given")
        return captions

    @torch.no_grad()
    def answer(self, images, questions, max_length: int = 10, num_beams: int = 3) -> list[str]:
        """Generated answers (beam search, as the original ``inference='generate'``)."""
        self._require("answer")
        pixels = self._images(images)
        ids, mask = self._texts(questions, 35, clean_question)
        if ids.shape[0] != pixels.shape[0]:
            raise ValueError(f"one question per image: got {pixels.shape[0]} images, {ids.shape[0]} questions")
        config = GenerationConfig(strategy="beam", max_length=max_length, min_length=1, num_beams=num_beams)
        return self.tokenizer.batch_decode(self.model.generate(pixels, ids, mask, config))


def load(path: str | Path, task: str | None = None, device: str | torch.device | None = None,
         image_size: int | None = None, dtype: torch.dtype = torch.float32, compile: bool = False) -> Blip:
    """Load a Salesforce ``.pth`` file or a Hugging Face directory into a :class:`Blip`.

    ``task`` (pretrain | retrieval | caption | vqa) is checked against the checkpoint's;
    ``image_size`` resamples the position embeddings; ``device`` defaults to CUDA if present. ``compile``:
    ``torch.compile`` each ViT block and text layer (blip_fast.models.compile): the first calls compile, later
    ones run faster on a GPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return Blip(load_checkpoint(path, task, image_size), device, dtype, compile)
