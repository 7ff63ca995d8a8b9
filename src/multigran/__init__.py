"""multigran: multi-granularity vision-language models on one Hugging Face-native backbone.

Importing the package registers the model with transformers' Auto classes, so `AutoConfig`,
`AutoModelForImageTextToText` and `AutoProcessor` load a saved multigran directory.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor

from .configuration import MultiGranConfig
from .modeling import MultiGranForConditionalGeneration
from .processing import MultiGranImageProcessor, MultiGranProcessor

__version__ = "0.1.0"

AutoConfig.register("multigran", MultiGranConfig, exist_ok=True)
AutoModelForImageTextToText.register(MultiGranConfig, MultiGranForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(MultiGranConfig, image_processor_classes={"pil": MultiGranImageProcessor}, exist_ok=True)
AutoProcessor.register(MultiGranConfig, MultiGranProcessor, exist_ok=True)

__all__ = [
    "MultiGranConfig",
    "MultiGranForConditionalGeneration",
    "MultiGranImageProcessor",
    "MultiGranProcessor",
]
