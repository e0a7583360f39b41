"""``blip-fast pretrain``: BLIP's pretraining (the original ``pretrain.py``) as a task of the shared engine.

The forward is BlipPretrain's: ITC against the momentum queues with momentum distillation, ITM with hard negatives,
LM; momentum update and enqueue inside. What pretraining adds to the engine (blip_fast.train.engine):

* alpha, the distillation weight, ramped from 0 over ``train.alpha_ramp_epochs`` as the original;
* the captions packed without their padding (``train.pack_text``), counted on the host from the tokenizer's mask;
* the queues checked against the global batch at start-up;
* the zero-shot retrieval evaluation at the end, on the held-out split, in fp32, split over the ranks;
* with ``train.distributed: fsdp``, the momentum update on the sharded weights just before each forward, and the
  (unsharded) temperature's gradient averaged over ranks by hand (blip_fast.train.fsdp says why).
"""

from __future__ import annotations

from pathlib import Path

from blip_fast.kernels.contrastive import MAX_DIM as ITC_MAX_DIM

from .. import ops
from ..config import ConfigError
from ..data.annotations import RetrievalAnnotations
from ..evaluation.retrieval import RetrievalResult, evaluate_retrieval
from ..models.blip_pretrain import BlipPretrain
from ..models.packing import PackedText
from ..ops.losses import itc_loss_op
from ..ops.momentum import enqueue_op
from .config import PretrainConfig
from .engine import RunSummary, Trainer, synthetic_folder, train_task
from .schedule import distillation_alpha
from .step import LOSSES, pretraining_losses

# packed captions' token counts are rounded up to these (blip_fast.models.packing): a multiple of 8 keeps GEMM rows
# aligned; under CUDA graphs, where each count is a graph of its own, 64 bounds the graphs a run captures
PACKED_TOKENS_MULTIPLE, PACKED_TOKENS_MULTIPLE_GRAPHED = 8, 64


class Pretrainer(Trainer):
    """BLIP pretraining on the shared engine: build it from a :class:`PretrainConfig` and :meth:`run` it."""

    task_name = "pretraining"
    eval_name = "zero-shot"
    """What the end-of-run evaluation's line calls the model's retrieval."""
    loss_names = LOSSES
    forward = staticmethod(pretraining_losses)
    evaluates_on_every_rank = True
    graphs_step = True

    def build_model(self) -> BlipPretrain:
        return BlipPretrain(self.model_config)

    def build_data(self) -> None:
        config = self.config
        source = self.caption_source()
        self.check_source(source)
        self.use_caption_batches(source)
        # a captured graph has one token count: rounding it up to 64 bounds the number of graphs
        self.pack_multiple = PACKED_TOKENS_MULTIPLE_GRAPHED if config.train.cuda_graph else PACKED_TOKENS_MULTIPLE

    def check_source(self, source) -> None:
        """What the task needs of its training pairs, checked before the first batch (pretraining: nothing)."""
        return None

    def check(self) -> None:
        """The queues take every micro-batch's momentum features of all ranks at once, and the ITC kernel holds
        ``embed_dim`` in registers: sizes it cannot take are refused here, not at step 1."""
        queue = self.model_config.queue_size
        batch = self.config.data.batch_size * self.ctx.world_size
        if batch > queue:
            raise ConfigError(f"model.queue_size={queue} is smaller than the global batch of {batch} pairs "
                              f"(data.batch_size={self.config.data.batch_size} x {self.ctx.world_size} ranks)")
        with ops.impl_scope(self.config.train.impl):
            backend = enqueue_op.select(self.device)
            itc_backend = itc_loss_op.select(self.device)
        if itc_backend == "triton" and self.model_config.embed_dim > ITC_MAX_DIM:
            raise ConfigError(f"model.embed_dim={self.model_config.embed_dim} is wider than the Triton ITC loss holds "
                              f"({ITC_MAX_DIM}); choose train.impl=auto,itc_loss=reference")
        if backend == "reference" and queue % batch:  # the original's enqueue writes whole batches only
            raise ConfigError(f"model.queue_size={queue} must be a multiple of the global batch of {batch} pairs "
                              f"with the reference enqueue (train.impl={self.config.train.impl})")

    def prepare(self, batch):
        if self.config.train.pack_text:  # counted on the host, from the tokenizer's mask
            batch.packing = PackedText.from_mask(batch.attention_mask, self.pack_multiple)
        return batch

    def step_alpha(self) -> float:
        p = self.progress
        return distillation_alpha(self.model_config.alpha, p.epoch, p.step_in_epoch, self.steps_per_epoch,
                                  self.config.train.alpha_ramp_epochs)

    def log_values(self) -> dict:
        return {"temp": float(self.model.temp.detach())}

    def final_evaluation_path(self) -> str | None:
        if not self.config.train.eval_size:
            return None
        if self.config.data.eval_path:
            return self.config.data.eval_path
        if self.config.data.kind == "synthetic":  # the held-out split of the built-in scenes
            return str(synthetic_folder(self.config) / "test.json")
        return None

    def evaluate_split(self, model, path: str) -> RetrievalResult:
        # relative image paths of a synthetic split are relative to its folder, of the user's to data.image_root
        root = Path(path).parent if self.config.data.kind == "synthetic" and not self.config.data.eval_path else \
            self.config.data.image_root
        return evaluate_retrieval(model, RetrievalAnnotations(path, root), self.model_config.vision.image_size,
                                  limit=self.config.train.eval_size or None, itm_k=self.config.train.eval_itm_k,
                                  distributed=self.ctx.active, workers=max(1, self.config.data.num_workers))


def pretrain(config: PretrainConfig, resume: str | bool = False, printer=print) -> RunSummary:
    return train_task(Pretrainer, config, resume, printer)
