"""NLVR2 fine-tuning (the original ``train_nlvr.py``) as a task of the shared engine.

The model is :class:`~blip_fast.models.BlipNLVR`, usually started from a pretrained checkpoint (``train.init_from``:
both image branches of every cross-attention start as the pretrained one); the loss is the cross-entropy of the
statements' true/false labels. The data are NLVR2 lists (``[{"images": [a, b], "sentence", "label"}]``,
``data.paths``), batched by :class:`~blip_fast.data.task_batches.NlvrBatches` with the original's augmentation (the
two images swapped, and "left" and "right" with them, half the time). With ``data.val_path`` every epoch is
validated and the best kept, and ``data.eval_path`` is evaluated with it, as the original.
"""

from __future__ import annotations

from ..config import ConfigError
from ..data.annotations import NlvrAnnotations
from ..data.task_batches import NlvrBatches
from ..evaluation.nlvr import NlvrResult, evaluate_nlvr
from ..models.blip_nlvr import BlipNLVR
from .config import PretrainConfig
from .engine import RunSummary, Trainer, train_task


class NlvrTrainer(Trainer):
    """NLVR2 fine-tuning on the shared engine: build it from a run config and :meth:`run` it."""

    task_name = "NLVR2 fine-tuning"
    eval_name = "fine-tuned"
    loss_names = ("nlvr",)

    def build_model(self) -> BlipNLVR:
        return BlipNLVR(self.model_config)

    def build_data(self) -> None:
        config, data = self.config, self.config.data
        if data.kind != "json":
            raise ConfigError("NLVR2 fine-tuning reads statement lists: data.kind=json with data.paths "
                              "(nlvr_train.json)")
        source = NlvrAnnotations(data.paths, data.image_root)
        self.batches = NlvrBatches(source, data.transform, data.batch_size, num_workers=data.num_workers,
                                   pin_memory=self.pins_batches,
                                   seed=config.train.seed, rank=self.ctx.rank, world_size=self.ctx.world_size,
                                   max_length=self.model_config.text.max_position_embeddings)
        self.count_steps(len(source))

    def evaluate_split(self, model, path: str) -> NlvrResult:
        return evaluate_nlvr(model, NlvrAnnotations(path, self.config.data.image_root),
                             self.model_config.vision.image_size, limit=self.config.train.eval_size or None)

    @staticmethod
    def forward(model, batch, alpha, generator) -> dict:
        return {"nlvr": model(batch.images, batch.input_ids, batch.attention_mask, batch.targets)}


def finetune_nlvr(config: PretrainConfig, resume: str | bool = False, printer=print) -> RunSummary:
    return train_task(NlvrTrainer, config, resume, printer)
