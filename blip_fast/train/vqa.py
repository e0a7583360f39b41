"""VQA fine-tuning (the original ``train_vqa.py``) as a task of the shared engine.

The model is :class:`~blip_fast.models.BlipVQA`, usually started from a pretrained checkpoint (``train.init_from``:
its question encoder and answer decoder come from the pretrained encoder and decoder). The loss is the original's:
every answer of a question through the decoder attending to the question's states, its LM loss weighted by the
answer's share of the human answers (Visual Genome answers 0.2), summed and averaged over the batch's questions.
The data are VQA v2 / Visual Genome question lists (``data.paths``; ``"dataset": "vg"`` entries' images under
``data.vg_image_root``), batched by :class:`~blip_fast.data.task_batches.VqaBatches`. The end-of-run evaluation
answers ``data.eval_path``'s questions by ranking ``data.answer_list`` (``train.vqa_inference``) and scores them
with the VQA accuracy where the questions carry their answers.
"""

from __future__ import annotations

from ..config import ConfigError
from ..data.annotations import VqaAnnotations, load_json_list
from ..data.task_batches import VqaBatches
from ..evaluation.vqa import VqaResult, check_not_trained_on, evaluate_vqa
from ..models.blip_vqa import BlipVQA
from .config import PretrainConfig
from .engine import RunSummary, Trainer, train_task


class VqaTrainer(Trainer):
    """VQA fine-tuning on the shared engine: build it from a run config and :meth:`run` it."""

    task_name = "VQA fine-tuning"
    eval_name = "fine-tuned"
    loss_names = ("vqa",)

    def build_model(self) -> BlipVQA:
        return BlipVQA(self.model_config)

    def image_roots(self):
        data = self.config.data
        return {"vqa": data.image_root, "vg": data.vg_image_root} if data.vg_image_root else data.image_root

    def build_data(self) -> None:
        config, data = self.config, self.config.data
        if data.kind != "json":
            raise ConfigError("VQA fine-tuning reads question lists: data.kind=json with data.paths "
                              "(vqa_train.json, vqa_val.json, vg_qa.json)")
        if data.eval_path:  # an inflated accuracy is worse than none: refused before training, not after
            check_not_trained_on(data.paths, data.eval_path)
            if config.train.vqa_inference == "rank" and not data.answer_list:
                raise ConfigError("train.vqa_inference=rank ranks the candidate answers of data.answer_list "
                                  "(answer_list.json): set it, or train.vqa_inference=generate")
        source = VqaAnnotations(data.paths, self.image_roots())
        self.batches = VqaBatches(source, data.transform, data.batch_size, num_workers=data.num_workers,
                                  pin_memory=self.pins_batches,
                                  seed=config.train.seed, rank=self.ctx.rank, world_size=self.ctx.world_size,
                                  answer_max_length=self.model_config.text.max_position_embeddings)
        self.count_steps(len(source))

    def evaluate_split(self, model, path: str) -> VqaResult:
        """The questions of ``path`` answered; the answers of the final evaluation also written in the official
        submission format to ``<out>/vqa_answers.json``."""
        config = self.config
        answer_list = load_json_list(config.data.answer_list) if config.data.answer_list else None
        result = evaluate_vqa(model, VqaAnnotations(path, self.image_roots()), self.model_config.vision.image_size,
                              answer_list, inference=config.train.vqa_inference, k=config.train.vqa_k,
                              limit=config.train.eval_size or None)
        if path == config.data.eval_path:
            result.write_answers(self.out / "vqa_answers.json")
        return result

    @staticmethod
    def forward(model, batch, alpha, generator) -> dict:
        return {"vqa": model(batch.images, batch.question_ids, batch.question_mask, batch.answer_ids,
                             batch.answer_mask, batch.weights, batch.answers_per_question)}


def finetune_vqa(config: PretrainConfig, resume: str | bool = False, printer=print) -> RunSummary:
    return train_task(VqaTrainer, config, resume, printer)
