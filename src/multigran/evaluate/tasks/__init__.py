"""The benchmarks `multigran eval --task NAME` knows: an explicit table name -> task class."""

from .ai2d import AI2D
from .base import Sample, Task
from .chartqa import ChartQA
from .docvqa import DocVQA
from .gqa import GQA
from .mmbench import MMBench, MMBenchSingle
from .mme import MME
from .mmmu import MMMU
from .pope import POPE
from .refcoco import RefCOCO, RefCOCOg, RefCOCOPlus
from .scienceqa import ScienceQAImg
from .seedbench import SEEDBench
from .textvqa import TextVQA, TextVQAWithOCR
from .vizwiz import VizWiz
from .vqav2 import VQAv2

TASKS: dict[str, type[Task]] = {
    "vqav2": VQAv2,
    "gqa": GQA,
    "vizwiz": VizWiz,
    "textvqa": TextVQA,
    "textvqa-ocr": TextVQAWithOCR,
    "scienceqa-img": ScienceQAImg,
    "pope": POPE,
    "mme": MME,
    "mmbench": MMBench,
    "mmbench-single": MMBenchSingle,
    "seed-bench": SEEDBench,
    "mmmu": MMMU,
    "ai2d": AI2D,
    "chartqa": ChartQA,
    "docvqa": DocVQA,
    "refcoco": RefCOCO,
    "refcoco+": RefCOCOPlus,
    "refcocog": RefCOCOg,
}


def get_task(name: str, **options) -> Task:
    if name not in TASKS:
        raise ValueError(f"--task {name!r}: unknown benchmark; known: {', '.join(TASKS)}")
    task_class = TASKS[name]
    if "box_format" in options and not issubclass(task_class, RefCOCO):
        options.pop("box_format")
    return task_class(**options)


__all__ = ["TASKS", "Sample", "Task", "get_task"]
