"""lmms-eval's entry point (group `lmms_eval.models`, declared in pyproject.toml): the manifest naming the model
class, so `lmms-eval --model multigran` finds it. Kept free of heavy imports: lmms-eval loads every entry point at
start-up."""


def manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="multigran", simple_class_path="multigran.evaluate.lmms_plugin.MultiGranLMMS")


__all__ = ["manifest"]
