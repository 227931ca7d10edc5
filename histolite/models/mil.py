"""Attention-based deep multiple-instance learning (Ilse, Tomczak and Welling, ICML 2018).

A bag (an image) is a set of instances (its patches). Each instance is embedded, an attention
network scores it, and the bag embedding is the attention-weighted mean that a linear layer
classifies. The attention weights say which patches decided the label, which is why this model
is explainable by construction.

Bags of different sizes share a batch through padding plus a boolean mask: padded slots get
zero attention, so a padded batch gives exactly the outputs of one bag at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from histolite.models.calibration import LogitScaling
from histolite.models.registry import create_feature_extractor
from histolite.models.wrapper import NormalizedClassifier
from histolite.runspec import MilSpec


class AttentionPooling(nn.Module):
    """``a_k = softmax_k(w^T tanh(V h_k))``; gated: ``w^T (tanh(V h_k) * sigmoid(U h_k))``.

    The gate (Ilse et al., eq. 9) lets the attention model non-linear interactions that tanh
    alone squashes; it costs one more linear layer.
    """

    def __init__(self, dim: int, attention_dim: int = 64, gated: bool = True) -> None:
        super().__init__()
        self.V = nn.Linear(dim, attention_dim)
        self.U = nn.Linear(dim, attention_dim) if gated else None
        self.w = nn.Linear(attention_dim, 1)

    def scores(self, h: Tensor) -> Tensor:
        """Each instance's attention score before the softmax: (..., N, D) -> (..., N).

        Per instance, so a served bag can be scored in chunks and pooled afterwards."""
        a = torch.tanh(self.V(h))
        if self.U is not None:
            a = a * torch.sigmoid(self.U(h))
        return self.w(a).squeeze(-1)

    @staticmethod
    def pool(h: Tensor, scores: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Softmax over each bag's scores, then the weighted mean of its instances."""
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)
        return torch.bmm(weights.unsqueeze(1), h).squeeze(1), weights

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``h`` (B, N, D), ``mask`` (B, N) bool -> pooled (B, D) and weights (B, N)."""
        return self.pool(h, self.scores(h), mask)


class AttentionMIL(nn.Module):
    """Bag classifier: optional image encoder -> embedding -> attention pooling -> linear.

    ``forward`` takes either images (B, N, 3, H, W), encoded here, or precomputed instance
    features (B, N, F), e.g. from a feature cache, and returns (logits, attention weights).
    """

    def __init__(
        self,
        encoder: nn.Module | None,
        feature_dim: int,
        num_classes: int,
        *,
        embed_dim: int = 128,
        attention_dim: int = 64,
        gated: bool = True,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.feature_dim = feature_dim
        self.embed_dim = embed_dim
        self.embed = nn.Sequential(
            nn.Linear(feature_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout)
        )
        self.pool = AttentionPooling(embed_dim, attention_dim, gated)
        self.classifier = nn.Linear(embed_dim, num_classes)
        self.calibration = LogitScaling()  # bag logits; attention is left as it is

    def classify(self, pooled: Tensor) -> Tensor:
        """Bag logits of pooled embeddings (B, D), calibrated once the run is."""
        return self.calibration(self.classifier(pooled))

    def encode(self, instances: Tensor, mask: Tensor) -> Tensor:
        """Features (B, N, F) of the real (unmasked) instances; padded slots stay zero."""
        if self.encoder is None:
            raise ValueError("this MIL model has no encoder; pass instance features (B, N, F)")
        features = self.encoder(instances[mask])
        out = features.new_zeros((*mask.shape, features.shape[-1]))
        out[mask] = features
        return out

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        h = x if x.dim() == 3 else self.encode(x, mask)
        pooled, attention = self.pool(self.embed(h), mask)
        return self.classify(pooled), attention


def build_attention_mil(
    backbone: str,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    spec: MilSpec,
    *,
    pretrained: bool = False,
    weights: str | None = None,
) -> AttentionMIL:
    """An :class:`AttentionMIL` whose encoder is a registry backbone with its own normalisation.

    For precomputed slide features (``spec.precomputed``) there is no encoder: the model
    starts at the feature embedding.
    """
    encoder: nn.Module | None = None
    if spec.precomputed:
        if spec.feature_dim is None:
            raise ValueError("precomputed MIL features need spec.feature_dim")
        dim = spec.feature_dim
    else:
        features, dim = create_feature_extractor(backbone, pretrained=pretrained, weights=weights)
        encoder = NormalizedClassifier(features, mean, std)
    return AttentionMIL(
        encoder,
        dim,
        num_classes,
        embed_dim=spec.embed_dim,
        attention_dim=spec.attention_dim,
        gated=spec.pooling == "gated",
        dropout=spec.dropout,
    )
