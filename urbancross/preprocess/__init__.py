"""Preprocessing on Ray Data: SAM segments and LMM-refined captions for a manifest."""

from urbancross.preprocess.pipeline import run_preprocess
from urbancross.preprocess.refine import check_caption, save_tiny_instructblip
from urbancross.preprocess.sam import ensure_tiny_sam, select_segments

__all__ = ["check_caption", "ensure_tiny_sam", "run_preprocess", "save_tiny_instructblip", "select_segments"]
