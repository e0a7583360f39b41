"""Caption fine-tuning (the original ``train_caption.py``) as a task of the shared engine.

The model is :class:`~blip_fast.models.BlipCaption`: the ViT and the image-grounded decoder; the loss is the LM loss
of ``prompt + caption`` with the prompt's tokens excluded, as the original (``"a picture of "``, the model config's
``prompt``). Captions come from the same sources as pretraining's (JSON lists, shards, the built-in scenes), each
written after the prompt; everything else -- speed, the step, resume, logging, checkpoints -- is the engine's
(blip_fast.train.engine).

``blip-fast finetune caption`` runs it (shipped config ``caption_coco``, the original's), usually from a
pretrained checkpoint (``train.init_from``). With ``data.val_path`` every epoch is evaluated as the original's
(beam search, then the COCO metrics: blip_fast.evaluation.captioning) and the best by CIDEr + BLEU-4 kept; the
end-of-run evaluation reads ``data.eval_path`` (``train.eval_size`` images at most).
"""

from __future__ import annotations

from ..data.annotations import RetrievalAnnotations
from ..evaluation.captioning import CaptionResult, evaluate_captioning
from ..models.blip_caption import BlipCaption
from ..text import BlipTokenizer
from .config import PretrainConfig
from .engine import RunSummary, Trainer, train_task


class CaptionTrainer(Trainer):
    """Caption fine-tuning on the shared engine: build it from a run config and :meth:`run` it."""

    task_name = "caption fine-tuning"
    eval_name = "fine-tuned"
    loss_names = ("lm",)

    def build_model(self) -> BlipCaption:
        return BlipCaption(self.model_config)

    def build_data(self) -> None:
        prompt = self.model_config.prompt
        # the original's prompt_length: [CLS] and the prompt's tokens, without the [SEP] the tokenizer appends
        tokens = BlipTokenizer()([prompt], max_length=self.model_config.max_text_length)
        self.prompt_length = tokens.input_ids.shape[1] - 1
        self.use_caption_batches(self.caption_source(), prompt=prompt)

    def forward(self, model, batch, alpha, generator) -> dict:
        return {"lm": model(batch.images, batch.input_ids, batch.attention_mask, self.prompt_length)}

    def evaluate_split(self, model, path: str) -> CaptionResult:
        annotations = RetrievalAnnotations(path, self.config.data.image_root)
        return evaluate_captioning(model, annotations, self.model_config.vision.image_size,
                                   limit=self.config.train.eval_size or None, java=self.config.train.eval_java)


def finetune_caption(config: PretrainConfig, resume: str | bool = False, printer=print) -> RunSummary:
    return train_task(CaptionTrainer, config, resume, printer)
