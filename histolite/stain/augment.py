"""Stain augmentation on batches: HED jitter (Tellez et al. 2019), random Reinhard and Macenko.

Both act on float batches (B, 3, H, W) in [0, 1] on whatever device the batch is on, so a
training run on a GPU augments on the GPU. Randomness comes from the augmenter's own CPU
generator, seeded by the run's seed and the process rank and saved in checkpoints, so turning
stain augmentation on does not change batch order or other augmentations, and DDP processes
draw different values.

- **HED jitter**: each image is unmixed into haematoxylin, eosin and DAB optical densities
  (Ruifrok and Johnston's stain vectors, as scikit-image's ``rgb2hed``), each channel is scaled
  by ``1 + U(-sigma, sigma)`` and shifted by ``U(-sigma, sigma)``, and the image is mixed back.
  Densities are natural-log optical densities; scikit-image's ``rgb2hed`` divides them by
  ``ln(1e-6)``, so a shift of sigma there is about 13.8 sigma here (the scale is unitless).
- **Random Reinhard**: each image gets Lab statistics drawn around those of the training set
  (a Gaussian per statistic, fitted on training images) and is normalised towards them.
- **Random Macenko**: each image gets H and E stain vectors and stain strengths drawn around
  those of the training set (a Gaussian per entry, fitted on training images) and is
  normalised towards them; tiles Macenko cannot read (glass, fat) pass unchanged.

Drawing targets around the training set's own spread keeps augmented colours plausible: the
model sees the stain variation of many labs' worth of slides without colours no lab produces.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor

from histolite.errors import DataError
from histolite.stain.macenko import MacenkoNormalizer, MacenkoStats
from histolite.stain.reinhard import ReinhardNormalizer, ReinhardStats

# Ruifrok & Johnston: rows are the OD of haematoxylin, eosin and DAB, exactly scikit-image's
# rgb_from_hed, so densities equal rgb2hed's (before its clipping at 0) up to its log scale.
RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64
)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
_LIGHT_FLOOR = 1.0 / 255.0


def rgb_to_hed(rgb: Tensor) -> Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> stain optical densities (B, 3, H, W): H, E, DAB."""
    od = -torch.log(rgb.clamp(min=_LIGHT_FLOOR))
    return torch.einsum("bchw,cd->bdhw", od, HED_FROM_RGB.to(od))


def hed_to_rgb(hed: Tensor) -> Tensor:
    od = torch.einsum("bdhw,dc->bchw", hed, RGB_FROM_HED.to(hed))
    return torch.exp(-od).clamp(0.0, 1.0)


def hed_jitter(images: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """Scale and shift each image's H, E and DAB densities by random amounts up to ``sigma``."""
    if sigma <= 0:
        return images
    if not images.is_floating_point():
        raise DataError(f"HED jitter needs a float batch in [0, 1], got {images.dtype}")
    n = images.shape[0]
    shape = (n, 3, 1, 1)
    alpha = 1.0 + (torch.rand(shape, generator=generator) * 2 - 1) * sigma
    beta = (torch.rand(shape, generator=generator) * 2 - 1) * sigma
    hed = rgb_to_hed(images.float())
    jittered = hed * alpha.to(hed) + beta.to(hed)
    return hed_to_rgb(jittered).to(images.dtype)


@dataclass(frozen=True)
class LabSpread:
    """Mean and spread of the per-image Lab statistics of a set of training images."""

    mean_of_means: tuple[float, float, float]
    std_of_means: tuple[float, float, float]
    mean_of_stds: tuple[float, float, float]
    std_of_stds: tuple[float, float, float]


def random_reinhard(
    images: Tensor, spread: LabSpread, generator: torch.Generator | None = None
) -> Tensor:
    """Each image normalised to Lab statistics drawn from ``spread`` (float in, float out)."""
    n = images.shape[0]

    def draw(centre: tuple[float, ...], width: tuple[float, ...]) -> Tensor:
        noise = torch.randn((n, 3), generator=generator, dtype=torch.float64)
        return torch.tensor(centre, dtype=torch.float64) + noise * torch.tensor(width)

    means = draw(spread.mean_of_means, spread.std_of_means)
    stds = draw(spread.mean_of_stds, spread.std_of_stds).clamp_min(1.0)
    normaliser = ReinhardNormalizer(ReinhardStats((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    return normaliser.torch_normalize(images, targets=(means, stds))


@dataclass(frozen=True)
class StainSpread:
    """Mean and spread of the Macenko stain vectors and strengths of a set of training images."""

    mean_matrix: tuple[tuple[float, float, float], tuple[float, float, float]]
    std_matrix: tuple[tuple[float, float, float], tuple[float, float, float]]
    mean_maxima: tuple[float, float]
    std_maxima: tuple[float, float]


def macenko_spread(images: list[Tensor]) -> StainSpread:
    """Stain vectors and 99th-percentile strengths of uint8 (3, H, W) images, summarised.

    Images Macenko cannot read (little tissue, one stain) are skipped; at least two must fit.
    """
    matrices, maxima = [], []
    for image in images:
        try:
            stats = MacenkoNormalizer.fit(image).target
        except DataError:
            continue
        matrices.append(torch.tensor(stats.stain_matrix, dtype=torch.float64))
        maxima.append(torch.tensor(stats.max_concentrations, dtype=torch.float64))
    if len(matrices) < 2:
        raise DataError(
            f"random Macenko needs H&E stains in at least 2 training images; {len(matrices)} of "
            f"{len(images)} sampled images had enough tissue"
        )
    m, c = torch.stack(matrices), torch.stack(maxima)

    def rows(t: Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        a, b = t.tolist()
        return (a[0], a[1], a[2]), (b[0], b[1], b[2])

    mean_max, std_max = c.mean(0).tolist(), c.std(0).tolist()
    return StainSpread(
        rows(m.mean(0)), rows(m.std(0)), (mean_max[0], mean_max[1]), (std_max[0], std_max[1])
    )


def draw_macenko_target(
    spread: StainSpread, generator: torch.Generator | None = None
) -> MacenkoStats:
    """One target drawn around ``spread``: stain vectors kept positive and of unit length."""
    mean = torch.tensor(spread.mean_matrix, dtype=torch.float64)
    noise = torch.randn((2, 3), generator=generator, dtype=torch.float64)
    matrix = (mean + noise * torch.tensor(spread.std_matrix, dtype=torch.float64)).clamp_min(1e-3)
    matrix = matrix / matrix.norm(dim=1, keepdim=True)
    centre = torch.tensor(spread.mean_maxima, dtype=torch.float64)
    draw = torch.randn(2, generator=generator, dtype=torch.float64)
    maxima = (centre + draw * torch.tensor(spread.std_maxima, dtype=torch.float64)).clamp_min(
        0.25 * centre
    )  # never near zero: that would bleach the tile
    (h, e) = matrix.tolist()
    return MacenkoStats(
        ((h[0], h[1], h[2]), (e[0], e[1], e[2])), (float(maxima[0]), float(maxima[1]))
    )


def random_macenko(
    images: Tensor,
    spread: StainSpread,
    generator: torch.Generator | None = None,
    fallbacks: Counter[str] | None = None,
) -> Tensor:
    """Each image normalised to stains drawn from ``spread`` (float in, float out).

    Tiles Macenko cannot read pass unchanged; why is counted in ``fallbacks`` when given.
    """
    out = images.clone()
    for i in range(images.shape[0]):
        normaliser = MacenkoNormalizer(draw_macenko_target(spread, generator))
        out[i] = normaliser(images[i])
        if fallbacks is not None:
            fallbacks.update(normaliser.counts)
    return out


class BatchStainAugment:
    """The stain augmentations a config asks for, applied to a float training batch."""

    def __init__(
        self,
        hed_sigma: float = 0.0,
        spread: LabSpread | None = None,
        stain_spread: StainSpread | None = None,
        seed: int = 0,
    ) -> None:
        self.hed_sigma = hed_sigma
        self.spread = spread
        self.stain_spread = stain_spread
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.fallbacks: Counter[str] = Counter()  # random Macenko tiles passed unchanged, by why

    def start(self, rank: int) -> None:
        """Seed for this process; each DDP rank draws its own values."""
        self.generator = torch.Generator().manual_seed(self.seed * 1009 + rank)

    def __bool__(self) -> bool:
        return self.hed_sigma > 0 or self.spread is not None or self.stain_spread is not None

    def __call__(self, images: Tensor) -> Tensor:
        # Colour maths in float32 even under mixed precision: pinv and exp/log need it.
        with torch.autocast(images.device.type, enabled=False):
            out = images.float()
            if self.spread is not None:
                out = random_reinhard(out, self.spread, self.generator)
            if self.stain_spread is not None:
                out = random_macenko(out, self.stain_spread, self.generator, self.fallbacks)
            return hed_jitter(out, self.hed_sigma, self.generator)


def lab_spread(images: list[Tensor]) -> LabSpread:
    """Per-image Lab means and stds of uint8 (3, H, W) images, summarised per channel."""
    from histolite.stain.colour import rgb_to_lab

    if len(images) < 2:
        raise DataError(f"random Reinhard needs at least 2 training images, got {len(images)}")
    means, stds = [], []
    for image in images:
        lab = rgb_to_lab(image.unsqueeze(0))[0].double().reshape(3, -1)
        means.append(lab.mean(dim=1))
        stds.append(lab.std(dim=1, unbiased=False))
    m, s = torch.stack(means), torch.stack(stds)

    def three(t: Tensor) -> tuple[float, float, float]:
        return (float(t[0]), float(t[1]), float(t[2]))

    return LabSpread(three(m.mean(0)), three(m.std(0)), three(s.mean(0)), three(s.std(0)))
