"""Evaluation of trained models: image-text retrieval (zero-shot and fine-tuned), captioning, VQA and NLVR2, and the
metrics they use (recall@K, the COCO caption metrics, the official VQA accuracy)."""

from .recall import recall_at_k
from .retrieval import RetrievalResult, evaluate_retrieval, retrieval_scores

__all__ = ["RetrievalResult", "evaluate_retrieval", "recall_at_k", "retrieval_scores"]
