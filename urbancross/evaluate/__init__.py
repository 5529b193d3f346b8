"""Retrieval evaluation: recall metrics and SMR re-ranking (torch only; no Ray import here)."""

from urbancross.evaluate.metrics import retrieval_metrics
from urbancross.evaluate.smr import smr_rerank

__all__ = ["retrieval_metrics", "smr_rerank"]
