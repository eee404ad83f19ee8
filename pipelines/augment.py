"""Batched SimCLR/PAWS augmentation in plain torch: flip, colour jitter, grayscale, blur.

Every sample draws its own parameters from a `torch.Generator` on the tensor's device, and
"apply with probability p" is a per-sample mask folded into the parameters (an identity
matrix, a delta kernel), so nothing here syncs with the host. It runs the same on CPU and CUDA
and knows nothing of FFCV or DALI.

Shapes: N images, H x W pixels; inputs are ``[N, H, W, 3]`` (HWC, as decoders write them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale
# RGB -> YIQ and back; a hue shift is a rotation of the (I, Q) plane.
RGB_TO_YIQ = (
    (0.299, 0.587, 0.114),
    (0.595716, -0.274453, -0.321263),
    (0.211456, -0.522591, 0.311135),
)
YIQ_TO_RGB = tuple(
    map(tuple, torch.linalg.inv(torch.tensor(RGB_TO_YIQ, dtype=torch.float64)).tolist())
)


@lru_cache(maxsize=64)
def _const(values: tuple, device: torch.device) -> torch.Tensor:
    """A small constant tensor, copied to `device` once (a copy per call would sync)."""
    return torch.tensor(values, dtype=torch.float32).to(device)


@dataclass(frozen=True)
class ViewAug:
    """Augmentation of one group of views (the large or the small crops)."""

    flip_p: float = 0.5
    color_strength: float = 1.0  # s: brightness, contrast, saturation 0.8s; hue 0.2s
    color_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int = 0  # odd kernel side; 0: about 10% of the image side


def stable_key(*parts: int) -> int:
    """A 64-bit key from ints, e.g. (seed, epoch, rank, stream): FNV-1a over their 64-bit
    words, so the same on every process and run (Python's `hash` is not, for strings)."""
    h = 0xCBF29CE484222325
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def seed_generator(device: torch.device | str, *key: int) -> torch.Generator:
    """A generator on `device` seeded by a tuple of ints, e.g. (seed, epoch, rank)."""
    return torch.Generator(device=device).manual_seed(stable_key(*key) & 0x7FFFFFFFFFFFFFFF)


def blur_kernel_size(side: int) -> int:
    """SimCLR's blur kernel: about 10% of the image side, odd, at least 3."""
    k = int(0.1 * side)
    return max(3, k + 1 - k % 2)


def augment_views(
    x: torch.Tensor,
    aug: ViewAug,
    generator: torch.Generator,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Flips, jitters, grays and blurs a batch of crops, then normalizes.

    Args:
        x: ``[N, H, W, 3]`` uint8, or float in [0, 1].
        aug: probabilities and ranges.
        generator: source of the per-sample parameters (on x's device).
        mean, std: per-channel normalization of [0, 1] values.
        dtype: floating type of the result.

    Returns:
        ``[N, 3, H, W]`` in channels-last memory format, normalized, in `dtype`.
    """
    if x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"augment_views expects [N, H, W, 3], got {list(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.float().mul_(1 / 255)  # [N, H, W, 3]
    else:
        x = x.float().contiguous()  # [N, H, W, 3]

    x = random_flip(x, aug.flip_p, generator)
    x = color_jitter(x, aug.color_strength, aug.color_p, generator)
    x = random_grayscale(x, aug.gray_p, generator)
    if aug.blur_p > 0:
        k = aug.blur_kernel or blur_kernel_size(min(x.shape[1], x.shape[2]))
        x = random_blur(x, aug.blur_p, aug.blur_sigma, k, generator)

    return normalize(x, mean, std, dtype)  # [N, 3, H, W]


def normalize(
    x: torch.Tensor,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``[N, H, W, 3]`` in [0, 1] -> normalized ``[N, 3, H, W]``, channels-last, in `dtype`.

    The HWC storage viewed as NCHW has channels-last strides, so the layout costs no copy.
    """
    scale = _const(tuple(1 / v for v in std), x.device)  # [3]
    shift = _const(tuple(-m / v for m, v in zip(mean, std, strict=True)), x.device)  # [3]
    x = torch.addcmul(shift, x, scale).to(dtype)  # [N, H, W, 3]
    return x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)  # [N, 3, H, W]


def _coin(n: int, p: float, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per-sample Bernoulli(p) as a bool tensor ``[n]`` on x's device."""
    return torch.rand(n, device=x.device, generator=g) < p


def _uniform(n: int, lo: float, hi: float, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, device=x.device, generator=g) * (hi - lo) + lo  # [n]


def random_flip(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """Mirrors each image left-right with probability p. x: ``[N, H, W, 3]``."""
    flip = _coin(x.shape[0], p, x, g)  # [N]
    if p <= 0:
        return x
    return torch.where(flip[:, None, None, None], x.flip(2), x)  # [N, H, W, 3]


def color_jitter(x: torch.Tensor, s: float, p: float, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation and hue jitter of strength s, each image with prob. p.

    The order is fixed (brightness, contrast, saturation + hue); saturation and hue are one
    3x3 matrix per image (hue rotates the IQ plane of YIQ), with one clamp after both.
    x: ``[N, H, W, 3]`` in [0, 1].
    """
    n = x.shape[0]
    on = _coin(n, p, x, g)  # [N]
    b = _uniform(n, max(0.0, 1 - 0.8 * s), 1 + 0.8 * s, x, g)  # [N]
    c = _uniform(n, max(0.0, 1 - 0.8 * s), 1 + 0.8 * s, x, g)  # [N]
    sat = _uniform(n, max(0.0, 1 - 0.8 * s), 1 + 0.8 * s, x, g)  # [N]
    hue = _uniform(n, -0.2 * s, 0.2 * s, x, g)  # [N], in turns
    one = torch.ones_like(b)
    b, c, sat = torch.where(on, b, one), torch.where(on, c, one), torch.where(on, sat, one)
    hue = torch.where(on, hue, torch.zeros_like(hue))
    if p <= 0 or s <= 0:
        return x

    # 1. Brightness: scale.
    x = (x * b[:, None, None, None]).clamp_(0, 1)  # [N, H, W, 3]

    # 2. Contrast: blend with the image's mean gray level.
    luma = _const(LUMA, x.device)  # [3]
    gray_mean = (x @ luma).mean(dim=(1, 2))  # [N]
    cc = c[:, None, None, None]
    x = (x * cc + (1 - cc) * gray_mean[:, None, None, None]).clamp_(0, 1)  # [N, H, W, 3]

    # 3. Saturation and hue: one colour matrix per image, identity where jitter is off.
    m = _hue_matrix(hue) @ _saturation_matrix(sat, luma)  # [N, 3, 3]
    m = torch.where(on[:, None, None], m, torch.eye(3, device=x.device).expand_as(m))
    return apply_color_matrix(x, m).clamp_(0, 1)  # [N, H, W, 3]


def _saturation_matrix(sat: torch.Tensor, luma: torch.Tensor) -> torch.Tensor:
    """sat * I + (1 - sat) * (gray to RGB), ``[N, 3, 3]``."""
    eye = torch.eye(3, device=sat.device)  # [3, 3]
    gray = luma.expand(3, 3)  # [3, 3]: every output channel is the luma
    s = sat[:, None, None]
    return s * eye + (1 - s) * gray  # [N, 3, 3]


def _hue_matrix(hue: torch.Tensor) -> torch.Tensor:
    """RGB -> YIQ, rotate IQ by 2*pi*hue, -> RGB, ``[N, 3, 3]``."""
    t = _const(RGB_TO_YIQ, hue.device)  # [3, 3]
    t_inv = _const(YIQ_TO_RGB, hue.device)  # [3, 3]
    theta = hue * (2 * math.pi)  # [N]
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(hue.shape[0], 3, 3, device=hue.device)  # [N, 3, 3]
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
    rot[:, 2, 1], rot[:, 2, 2] = sin, cos
    return t_inv @ rot @ t  # [N, 3, 3]


def apply_color_matrix(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """out[n, h, w, :] = m[n] @ x[n, h, w, :]. x: ``[N, H, W, 3]``, m: ``[N, 3, 3]``."""
    n, h, w, _ = x.shape
    y = torch.bmm(x.reshape(n, h * w, 3), m.transpose(1, 2))  # [N, H*W, 3]
    return y.view(n, h, w, 3)


def random_grayscale(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """Replaces each image by its luma on all three channels with probability p."""
    on = _coin(x.shape[0], p, x, g)  # [N]
    if p <= 0:
        return x
    gray = (x @ _const(LUMA, x.device))[..., None].expand_as(x)  # [N, H, W, 3]
    return torch.where(on[:, None, None, None], gray, x)  # [N, H, W, 3]


def gaussian_kernels(sigma: torch.Tensor, k: int) -> torch.Tensor:
    """Normalized 1-D Gaussians of side k, one per sigma: ``[N, k]``."""
    t = torch.arange(k, device=sigma.device, dtype=torch.float32) - (k - 1) / 2  # [k]
    w = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))  # [N, k]
    return w / w.sum(dim=1, keepdim=True)


@lru_cache(maxsize=16)
def _reflect_index(n: int, k: int, device: torch.device) -> torch.Tensor:
    """Source pixel of each tap of a k-tap window centred on each of n pixels, reflect
    padding (as ``F.pad(mode="reflect")``): ``[n, k]`` int64."""
    i = torch.arange(n)[:, None] + torch.arange(k)[None] - k // 2  # [n, k]
    i = i.abs()
    i = torch.where(i > n - 1, 2 * (n - 1) - i, i)
    return i.to(device)


def blur_matrices(kern: torch.Tensor, n: int) -> torch.Tensor:
    """Banded ``[N, n, n]`` matrices that convolve a length-n signal with each row of kern
    ``[N, k]`` (reflect padding): out = M @ signal."""
    idx = _reflect_index(n, kern.shape[1], kern.device)  # [n, k]
    idx = idx.expand(kern.shape[0], -1, -1)  # [N, n, k]
    taps = kern[:, None, :].expand(-1, n, -1)  # [N, n, k]
    return kern.new_zeros(kern.shape[0], n, n).scatter_add_(2, idx, taps)  # [N, n, n]


def random_blur(
    x: torch.Tensor, p: float, sigma: tuple[float, float], k: int, g: torch.Generator
) -> torch.Tensor:
    """Separable Gaussian blur, sigma per image, each image with probability p.

    Each direction is one batched matmul with a banded matrix per image (reflect padding
    built in; a delta kernel where the coin says no): on 2 CPU cores this beat a grouped
    convolution 1.5x, and it needs no NCHW copy. x: ``[N, H, W, 3]``.
    """
    n, h, w, _ = x.shape
    on = _coin(n, p, x, g)  # [N]
    sig = _uniform(n, sigma[0], sigma[1], x, g)  # [N]
    if p <= 0:
        return x
    if k // 2 >= min(h, w):  # reflect padding needs pad < side
        raise ValueError(f"blur kernel {k} too large for {h}x{w} images")
    kern = gaussian_kernels(sig, k)  # [N, k]
    delta = torch.zeros_like(kern)
    delta[:, k // 2] = 1
    kern = torch.where(on[:, None], kern, delta)  # [N, k]

    rows = torch.bmm(blur_matrices(kern, h), x.reshape(n, h, w * 3))  # [N, H, W*3]
    cols = rows.view(n, h, w, 3).transpose(1, 2).reshape(n, w, h * 3)  # [N, W, H*3]
    cols = torch.bmm(blur_matrices(kern, w), cols)  # [N, W, H*3]
    return cols.view(n, w, h, 3).transpose(1, 2)  # [N, H, W, 3]
