"""Evaluation of trained models: zero-shot and fine-tuned image-text retrieval."""

from .recall import recall_at_k
from .retrieval import RetrievalResult, evaluate_retrieval, retrieval_scores

__all__ = ["RetrievalResult", "evaluate_retrieval", "recall_at_k", "retrieval_scores"]
