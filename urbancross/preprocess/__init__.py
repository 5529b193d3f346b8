"""Preprocessing on Ray Data: SAM segments and LMM-refined captions for a manifest."""

from urbancross.preprocess.pipeline import run_preprocess
from urbancross.preprocess.refine import check_caption
from urbancross.preprocess.sam import select_segments

__all__ = ["check_caption", "run_preprocess", "select_segments"]
