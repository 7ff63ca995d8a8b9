"""Benchmark metrics, apart from models: each transcribes the official scorer's rules (see each module)."""

from .choice import (ai2d_correct, ai2d_letter, letters, mmbench_letter, mmmu_letter, mmmu_open_correct,
                     options_block, scienceqa_letter)
from .grounding import iou, parse_box, reference_box
from .text import anls, gqa_correct, relaxed_correct
from .vqa import process_answer, vqa_accuracy
from .yesno import mme_answer, mme_scores, pope_answer, pope_metrics

__all__ = ["ai2d_correct", "ai2d_letter", "anls", "gqa_correct", "iou", "letters", "mmbench_letter", "mme_answer",
           "mme_scores", "mmmu_letter", "mmmu_open_correct", "options_block", "parse_box", "pope_answer",
           "pope_metrics", "process_answer", "reference_box", "relaxed_correct", "scienceqa_letter", "vqa_accuracy"]
