"""LLaVA-UHD v2 stage 0: the JBU upsampler trained alone by hierarchical supervision on an image folder.

Not a conversation stage: the data are bare images, the loss is `JBUStage0Loss` (jittered views, per-level attention
downsamplers, uncertainty term, random 1024 -> 30 projection; CRF term behind `loss.crf_weight`), the target is the
model's own frozen vision tower (layer `vision_feature_layer`, -2). Only `visual.upsampler` (and the loss's helper
heads) learn; NAdam, lr 1e-3 (release `featup/train_vdim_upsampler.py` with `featup/configs/vdim_upsampler.yaml`;
spec section 3).

Recipe (YAML; `multigran train --recipe recipes/uhd/stage0_jbu.yaml` runs it when it says `stage: jbu`, and so does
`python -m multigran.train.uhd_stage0 --recipe R.yaml [key.sub=value ...]`):

    stage: jbu
    model: PATH                  # a multigran "uhd" model directory (vision tower = frozen target, JBU = trained)
    output_dir: PATH             # jbu.safetensors, metrics.jsonl and (save_model) model/ = the model with its new JBU
    data:
      path: FOLDER               # any image folder, searched recursively (.png .jpg .jpeg .webp .bmp .gif .tif .tiff)
      image_size: null           # side of the square training crop; null = the tower's image size (336 for CLIP-L)
      max_images: null           # use only the first N images (sorted paths)
      resample: nearest          # resize filter: nearest (release) or bilinear
      normalize: imagenet        # imagenet (release: ImageNet mean/std) or processor (the model's CLIP mean/std)
    loss:                        # JBUStage0Loss options (release values)
      n_jitters: 2
      max_pad: 30
      max_zoom: 2.0
      projection_dim: 30
      crf_weight: 0.0            # the released checkpoint used 0.001
    training:
      num_train_epochs: 1
      max_steps: null            # optimizer steps; overrides num_train_epochs
      per_device_train_batch_size: 2
      gradient_accumulation_steps: 8   # release: 2 images per GPU x 8 GPUs = 16 per step
      learning_rate: 1.0e-3      # NAdam
      seed: 0
      logging_steps: 10
      device: auto               # cuda when available, else cpu
      save_model: true           # also write output_dir/model (config, weights, processor): the next stage's `model`
      early_clip_steps: 10       # the first N optimizer steps clip the gradient norm to early_clip_norm (release)
      early_clip_norm: 1.0e-4    # (0 steps = no clipping)

Data as the release (`featup/util.py:293-296` `get_transform(res, False, "center")`, used by
`featup/train_vdim_upsampler.py:485`): torchvision `Resize(image_size, NEAREST)` (shorter side -> image_size, longer
side truncated), `CenterCrop(image_size)`, `ToTensor`, `Normalize` with ImageNet's mean/std (`featup/util.py:62`) - the
same tensor is the JBU's guidance and the frozen tower's input (the release's CLIP featurizer takes it as is).
Documented alternatives (not the release): `data.resample: bilinear` (antialiased, instead of nearest-neighbour
aliasing) and `data.normalize: processor` (the CLIP statistics the tower was trained with and the pipeline's guidance
uses at inference). The release clips the gradient norm of all trained parameters to 1e-4 during its first 10
optimizer steps (`train_vdim_upsampler.py:270-271`); `training.early_clip_steps` / `early_clip_norm`. One process, one
device.
`jbu.safetensors` holds `visual.upsampler.*` (the model's key names) and the stage-0 heads under `stage0.*`; load it
into a model with `load_jbu_weights(model, path)`, or convert a release with `multigran convert uhd-v2 --jbu PATH`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from ..image_io import load_image
from ..pipelines.uhd_jbu import JBU4xStack, JBUStage0Loss, clip_featurizer

logger = logging.getLogger(__name__)

STAGE = "jbu"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
UPSAMPLER_PREFIX = "visual.upsampler."
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # featup/util.py:62, the release's stage-0 normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR}
NORMALIZE = ("imagenet", "processor")


@dataclass
class JbuData:
    path: str
    image_size: int | None = None
    max_images: int | None = None
    resample: str = "nearest"
    normalize: str = "imagenet"


@dataclass
class JbuLoss:
    n_jitters: int = 2
    max_pad: int = 30
    max_zoom: float = 2.0
    projection_dim: int = 30
    crf_weight: float = 0.0


@dataclass
class JbuTraining:
    num_train_epochs: int = 1
    max_steps: int | None = None
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 8
    learning_rate: float = 1e-3
    seed: int = 0
    logging_steps: int = 10
    device: str = "auto"
    save_model: bool = True
    early_clip_steps: int = 10
    early_clip_norm: float = 1e-4


@dataclass
class JbuRecipe:
    model: str
    output_dir: str
    data: JbuData
    loss: JbuLoss = field(default_factory=JbuLoss)
    training: JbuTraining = field(default_factory=JbuTraining)
    stage: str = STAGE
    source: str | None = None


def _read_yaml(path) -> dict:
    from .recipe import resolve_recipe

    path = Path(resolve_recipe(path))  # a file, or a recipe shipped with the package by name
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"recipe {path}: not valid YAML: {error}") from None
    if not isinstance(tree, dict):
        raise ValueError(f"recipe {path}: expected a YAML mapping at the top level")
    return tree


def is_jbu_recipe(path) -> bool:
    """Whether a recipe file is a stage-0 JBU recipe (`stage: jbu`), for the training CLI's dispatch."""
    return _read_yaml(path).get("stage") == STAGE


def _apply_override(tree: dict, text: str):
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {text!r} is not of the form key.sub=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as error:
        raise ValueError(f"override {text!r}: the value is not valid YAML: {error}") from None
    path = key.strip().split(".")
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {text!r}: {part!r} is a value, not a section")
    node[path[-1]] = parsed


def _build(cls, values, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"recipe {where}: expected a mapping, got {type(values).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"recipe {where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    try:
        return cls(**values)
    except TypeError as error:
        raise ValueError(f"recipe {where}: {error}") from None


def load_jbu_recipe(path, overrides=()) -> JbuRecipe:
    """Reads a stage-0 recipe, applies `key.sub=value` overrides (YAML values), validates it (unknown keys: errors)."""
    tree = _read_yaml(path)
    for text in overrides:
        _apply_override(tree, text)
    where = str(path)
    if tree.get("stage") != STAGE:
        raise ValueError(f"recipe {where}: not a stage-0 JBU recipe (it needs `stage: {STAGE}`)")
    top = {"stage", "model", "output_dir", "data", "loss", "training"}
    unknown = sorted(set(tree) - top)
    if unknown:
        raise ValueError(f"recipe {where}: unknown key(s) {unknown}; known keys: {sorted(top)}")
    for key in ("model", "output_dir", "data"):
        if tree.get(key) in (None, "", {}):
            raise ValueError(f"recipe {where}: '{key}' is required")
    recipe = JbuRecipe(
        model=str(tree["model"]), output_dir=str(tree["output_dir"]),
        data=_build(JbuData, tree["data"], f"{where} (data)"),
        loss=_build(JbuLoss, tree.get("loss") or {}, f"{where} (loss)"),
        training=_build(JbuTraining, tree.get("training") or {}, f"{where} (training)"), source=where,
    )
    t = recipe.training
    # YAML 1.1 (PyYAML) reads 1e-3 as a string ("1.0e-3" is a float): accept numeric strings for the float fields.
    for section, name in ((t, "learning_rate"), (t, "early_clip_norm"), (recipe.loss, "max_zoom"),
                          (recipe.loss, "crf_weight")):
        value = getattr(section, name)
        if isinstance(value, str):
            try:
                setattr(section, name, float(value))
            except ValueError:
                raise ValueError(f"recipe {where}: {name} must be a number, got {value!r}") from None
    for name in ("num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
        value = getattr(t, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"recipe {where} (training): {name} must be an int >= 1, got {value!r}")
    if t.max_steps is not None and (not isinstance(t.max_steps, int) or t.max_steps < 1):
        raise ValueError(f"recipe {where} (training): max_steps must be null or an int >= 1, got {t.max_steps!r}")
    if not isinstance(t.learning_rate, (int, float)) or t.learning_rate <= 0:
        raise ValueError(f"recipe {where} (training): learning_rate must be > 0, got {t.learning_rate!r}")
    if isinstance(t.early_clip_steps, bool) or not isinstance(t.early_clip_steps, int) or t.early_clip_steps < 0:
        raise ValueError(f"recipe {where} (training): early_clip_steps must be an int >= 0, got {t.early_clip_steps!r}")
    if not isinstance(t.early_clip_norm, (int, float)) or t.early_clip_norm <= 0:
        raise ValueError(f"recipe {where} (training): early_clip_norm must be > 0, got {t.early_clip_norm!r}")
    if recipe.data.resample not in RESAMPLE:
        raise ValueError(f"recipe {where} (data): resample must be one of {sorted(RESAMPLE)}, got "
                         f"{recipe.data.resample!r}")
    if recipe.data.normalize not in NORMALIZE:
        raise ValueError(f"recipe {where} (data): normalize must be one of {list(NORMALIZE)}, got "
                         f"{recipe.data.normalize!r}")
    return recipe


def list_images(folder, max_images=None) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if max_images is not None:
        paths = paths[:max_images]
    if not paths:
        raise ValueError(f"{root}: the image folder holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    return paths


def resize_and_center_crop(image: Image.Image, size: int, resample: str = "nearest") -> Image.Image:
    """torchvision's `Resize(size)` + `CenterCrop(size)` on a PIL image, as the release's stage-0 transform.

    Resize: the shorter side -> `size`, the longer side int(size * long / short) (truncated); unchanged when the shorter
    side already is `size`. CenterCrop: top-left corner at int(round((side - size) / 2)) (Python rounding, halves to
    even). `resample`: "nearest" (release) or "bilinear".
    """
    if resample not in RESAMPLE:
        raise ValueError(f"resize_and_center_crop: resample must be one of {sorted(RESAMPLE)}, got {resample!r}")
    width, height = image.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), RESAMPLE[resample])
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


class ImageFolderDataset(torch.utils.data.Dataset):
    """Every image of a folder as a normalised (3, size, size) float tensor (`resize_and_center_crop`, then
    (pixels / 255 - mean) / std)."""

    def __init__(self, paths, size: int, mean, std, resample: str = "nearest"):
        self.paths, self.size, self.resample = list(paths), size, resample
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        image = resize_and_center_crop(load_image(self.paths[index]), self.size, self.resample)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        return (pixels - self.mean) / self.std


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"training.device {name!r} was asked for but CUDA is not available on this machine")
    return torch.device(name)


def load_jbu_weights(model, path) -> None:
    """Loads the `visual.upsampler.*` tensors of a stage-0 `jbu.safetensors` into a multigran "uhd" model.

    A model with the 2x stack (feature_scale_mask 2 or 3) takes up1 and the fix-up and leaves the checkpoint's up2
    aside (logged), as the release loads the 4x stage-0 checkpoint with strict=False (hubconf.py:166-169).
    """
    state = {k[len(UPSAMPLER_PREFIX):]: v for k, v in load_file(str(path)).items() if k.startswith(UPSAMPLER_PREFIX)}
    upsampler = getattr(model.visual, "upsampler", None)
    if upsampler is None:
        raise ValueError("the model has no JBU upsampler (method 'uhd' with feature_scale_mask using 2x or 4x)")
    if not state:
        raise ValueError(f"{path} holds no {UPSAMPLER_PREFIX}* tensors")
    if not isinstance(upsampler, JBU4xStack):
        unused = sorted(k for k in state if k.startswith("up2."))
        if unused:
            logger.info("%s: the 2x JBU stack has no second step: %d up2 tensors left unused", path, len(unused))
        state = {k: v for k, v in state.items() if not k.startswith("up2.")}
    upsampler.load_state_dict(state, strict=True)


def train_jbu(recipe: JbuRecipe) -> dict:
    """Runs stage 0; returns {"losses": [per optimizer step], "steps": n, "output_dir": path}."""
    from ..modeling import MultiGranForConditionalGeneration
    from ..processing import MultiGranProcessor

    model = MultiGranForConditionalGeneration.from_pretrained(recipe.model, dtype=torch.float32)
    if model.config.method != "uhd" or getattr(model.visual, "upsampler", None) is None:
        raise ValueError(f"{recipe.model} is not a LLaVA-UHD v2 model with a JBU upsampler (method 'uhd', "
                         "feature_scale_mask with 2x or 4x): stage 0 trains that upsampler")
    if not isinstance(model.visual.upsampler, JBU4xStack):
        raise ValueError(
            f"{recipe.model} has the 2x JBU stack (feature_scale_mask "
            f"{model.config.method_settings.get('feature_scale_mask')}): stage 0 trains the 4x stack (release "
            "vdim_upsampler.yaml: jbu_4x_stack), whose up1 and fix-up a 2x model then loads; train on a model with "
            "feature_scale_mask 4..7 and load the result with "
            "load_jbu_weights or `multigran convert uhd-v2 --jbu`"
        )
    processor = MultiGranProcessor.from_pretrained(recipe.model)
    vision = model.config.vision_config
    size = recipe.data.image_size or vision.image_size
    if size % vision.patch_size:
        raise ValueError(f"data.image_size {size} must be a multiple of the tower's patch size {vision.patch_size}")
    device = _resolve_device(recipe.training.device)
    t = recipe.training
    torch.manual_seed(t.seed)  # dropout masks and the criterion's helper init

    if recipe.data.normalize == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = processor.image_processor.image_mean, processor.image_processor.image_std
    dataset = ImageFolderDataset(list_images(recipe.data.path, recipe.data.max_images), size, mean, std,
                                 recipe.data.resample)
    loader = torch.utils.data.DataLoader(dataset, batch_size=t.per_device_train_batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(t.seed))
    tower = model.vision_tower.to(device).eval().requires_grad_(False)
    upsampler = model.visual.upsampler.to(device).train()
    criterion = JBUStage0Loss(feat_dim=vision.hidden_size, patch_size=vision.patch_size, **asdict(recipe.loss))
    criterion.to(device).train()
    featurizer = clip_featurizer(tower, model.config.vision_feature_layer)
    trained = [*upsampler.parameters(), *criterion.parameters()]
    optimizer = torch.optim.NAdam(trained, lr=t.learning_rate)
    generator = torch.Generator(device=device).manual_seed(t.seed)  # jitters and random projections

    steps_per_epoch = math.ceil(len(loader) / t.gradient_accumulation_steps)
    total = t.max_steps or steps_per_epoch * t.num_train_epochs
    output = Path(recipe.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    logger.info("stage 0 (JBU): %d images of %dx%d, %d optimizer steps of %d x %d images, lr %g, on %s",
                len(dataset), size, size, total, t.per_device_train_batch_size, t.gradient_accumulation_steps,
                t.learning_rate, device)
    losses, step, micro = [], 0, 0
    sums = dict.fromkeys(("loss", "rec_2x", "rec_4x", "crf"), 0.0)
    with open(output / "metrics.jsonl", "w", encoding="utf-8") as metrics:
        while step < total:
            for images in loader:
                out = criterion(upsampler, featurizer, images.to(device), generator=generator)
                (out["loss"] / t.gradient_accumulation_steps).backward()
                for key in sums:
                    sums[key] += float(out[key].detach()) / t.gradient_accumulation_steps
                micro += 1
                if micro % t.gradient_accumulation_steps:
                    continue
                if step < t.early_clip_steps:  # release: clip_gradients(opt, 1e-4, "norm") while global_step < 10
                    torch.nn.utils.clip_grad_norm_(trained, t.early_clip_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append(sums["loss"])
                metrics.write(json.dumps({"step": step, **sums}) + "\n")
                if step % t.logging_steps == 0 or step == total:
                    logger.info("step %d/%d: loss %.4f (2x %.4f, 4x %.4f, crf %.4f)", step, total, *sums.values())
                sums = dict.fromkeys(sums, 0.0)
                if step == total:
                    break

    model.visual.upsampler.eval()
    state = {UPSAMPLER_PREFIX + k: v.detach().cpu().contiguous() for k, v in upsampler.state_dict().items()}
    state.update({"stage0." + k: v.detach().cpu().contiguous() for k, v in criterion.state_dict().items()})
    save_file(state, str(output / "jbu.safetensors"), metadata={"format": "pt", "stage": "uhd-stage0-jbu"})
    if t.save_model:
        model.to("cpu").save_pretrained(output / "model")
        processor.save_pretrained(output / "model")
    logger.info("stage 0 done: %s", output)
    return {"losses": losses, "steps": step, "output_dir": str(output)}


def run_jbu_recipe(path, overrides=()) -> dict:
    """Loads a `stage: jbu` recipe (+ overrides) and trains; the training CLI's entry point for stage 0."""
    return train_jbu(load_jbu_recipe(path, overrides))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multigran.train.uhd_stage0",
                                     description="LLaVA-UHD v2 stage 0: train the JBU upsampler on an image folder")
    parser.add_argument("--recipe", required=True, help="a `stage: jbu` recipe YAML")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides (YAML values)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = run_jbu_recipe(args.recipe, args.overrides)
    except (ValueError, TypeError, FileNotFoundError, OSError) as error:
        print(f"multigran: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {result['output_dir']}")
    return 0


__all__ = ["JbuRecipe", "is_jbu_recipe", "load_jbu_recipe", "run_jbu_recipe", "train_jbu", "load_jbu_weights",
           "resize_and_center_crop", "list_images"]


if __name__ == "__main__":
    sys.exit(main())

