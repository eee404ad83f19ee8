"""Configuration sections owned by the data pipelines."""

from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROPS = ("auto", "host", "device")  # DataConfig.crops: where the FFCV views are cut


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how batches are drawn (per rank)."""

    data: str = "data/digits"  # dataset folder written by convert/ (holds manifest.json)
    backend: str = "ffcv"  # ffcv | dali
    labels: str = "1pct"  # 1pct | 10pct | path to a split file
    split_file: str = ""  # explicit split file for 1pct/10pct (else looked up in `data`)
    batch_size: int = 64  # unlabeled source images per rank and step
    classes_per_batch: int = 20  # C: classes in each labeled batch
    images_per_class: int = 2  # K: labeled images of each class in a batch
    n_supervised_views: int = 1  # large-crop views of each labeled image
    per_rank_classes: bool = False  # each rank draws its own classes (default: shared classes)
    num_workers: int = 2  # decoding threads/workers
    # FFCV: where the unlabeled views are cut from each decode: "auto" (on the device when it
    # is a GPU, else by the worker threads), "host" (the worker threads) or "device".
    crops: str = "auto"
    # Labeled store folder (labeled images decoded once): "" = DATA/cache, falling back to
    # ~/.cache/suncet-trainer where DATA is read-only; else this folder only.
    cache_dir: str = ""
    drop_last: bool = True


@dataclass(frozen=True)
class AugConfig:
    """Multi-crop SimCLR augmentation (SimCLR/PAWS recipe)."""

    n_large: int = 2
    large_size: int = 224
    large_scale: tuple[float, float] = (0.08, 1.0)
    n_small: int = 6
    small_size: int = 96
    small_scale: tuple[float, float] = (0.05, 0.14)
    color_strength: float = 1.0  # s: jitter 0.8s, 0.8s, 0.8s, 0.2s
    color_p: float = 0.8
    gray_p: float = 0.2
    blur_p_large: float = 0.5
    blur_p_small: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    eval_size: int = 224  # centre-crop size for evaluation
    eval_resize: int = 256  # shorter side before the centre crop
