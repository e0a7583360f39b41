"""Image-text retrieval fine-tuning (the original ``train_retrieval.py``) as a task of the shared engine.

The model is :class:`~blip_fast.models.BlipRetrieval`, usually started from a pretrained checkpoint
(``train.init_from``); its losses are ITC with every caption of the same image a positive and ITM with same-image
pairs kept out of the hard negatives (:meth:`BlipRetrieval.forward`). The data are caption lists whose entries carry
an ``image_id`` (COCO's and Flickr30k's Karpathy training files, or ``blip-fast data synth --task retrieval``).
The rest is pretraining's (blip_fast.train.pretraining): the queues checked against the batch, alpha ramped in (over
the first epoch in the shipped configs, as the original), the retrieval evaluation at the end (ITC top-k re-ranked
by ITM, ``train.eval_itm_k``: 256 for COCO, 128 for Flickr30k) on ``data.eval_path``.
With ``data.val_path`` the validation split is evaluated after every epoch and the best epoch's weights are kept
(blip_fast.train.engine); under torchrun every rank evaluates its share of the images
(blip_fast.evaluation.retrieval.retrieval_scores).

Not done yet: the fused ITC kernel's image-id targets (the reference ITC runs here).
"""

from __future__ import annotations

from ..config import ConfigError
from ..data.annotations import CaptionAnnotations
from ..models.blip_retrieval import BlipRetrieval
from .config import PretrainConfig
from .engine import RunSummary, train_task
from .pretraining import Pretrainer


class RetrievalTrainer(Pretrainer):
    """Retrieval fine-tuning on the shared engine: build it from a run config and :meth:`run` it."""

    task_name = "retrieval fine-tuning"
    eval_name = "fine-tuned"
    loss_names = ("itc", "itm")
    graphs_step = False  # its step's replay has a GPU test (CudaGraphStep), which has not run on a GPU yet

    def build_model(self) -> BlipRetrieval:
        return BlipRetrieval(self.model_config)

    def check_source(self, source) -> None:
        if isinstance(source, CaptionAnnotations) and not source.img_ids:
            raise ConfigError(f"retrieval fine-tuning needs an image_id in the entries of {self.config.data.paths} "
                              "(the captions of one image are each other's positives); COCO's and Flickr30k's "
                              "Karpathy training files have them")

    def prepare(self, batch):
        if batch.img_ids is None:  # a shard or an entry without its image's id
            raise ConfigError("retrieval fine-tuning needs the image id of every training pair (an image_id in "
                              "every entry of the annotation files)")
        return batch

    @staticmethod
    def forward(model, batch, alpha, generator) -> dict:
        return model(batch.images, batch.input_ids, batch.attention_mask, batch.img_ids, alpha, generator)


def finetune_retrieval(config: PretrainConfig, resume: str | bool = False, printer=print) -> RunSummary:
    return train_task(RetrievalTrainer, config, resume, printer)
