"""Evaluation: the papers' benchmarks with their official metrics (`tasks`, `metrics`), the answering engine
(resumable, sharded), results tables, and the lmms-eval plugin (`lmms_plugin`)."""

from .tasks import TASKS, Sample, Task, get_task

__all__ = ["TASKS", "Sample", "Task", "get_task"]
