from .features import select_vision_features, tower_grid, tower_has_cls_token

__all__ = ["select_vision_features", "tower_grid", "tower_has_cls_token"]
