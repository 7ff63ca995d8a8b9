"""Converters from released checkpoint formats into multigran directories (one file per source format)."""

from .common import CheckpointMismatchError
from .avg_llava import from_avg_llava
from .llava_next import from_llava_next
from .mg_llava import from_mg_llava
from .uhd_v2 import from_uhd_v2

__all__ = ["CheckpointMismatchError", "from_avg_llava", "from_llava_next", "from_mg_llava", "from_uhd_v2"]
