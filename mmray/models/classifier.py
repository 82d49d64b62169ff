"""``FusionClassifier``: encoders + fusion + one head per task, assembled from supplied parts.

Mirrors torchmultimodal's ``LateFusion``: the model knows nothing about config; ``builder.py`` does.
Optional auxiliary unimodal heads (one per modality and task) read each encoder's pooled output; their
losses (gradient blending, Wang et al. 2020) keep the weaker modality's encoder learning when the
fused head alone would lean on the easier modality.

``forward`` = ``encode`` (run every encoder once) + ``masks`` + ``predict`` (fusion + heads), so a
modality ablation re-runs only ``predict`` with other masks (``mmray.score.ablation``). Its output also
carries the representation the heads and the fusion read (``fused``, and each encoder's ``pooled``
vector), so ``mmray embed`` takes it from the same forward pass that ``mmray score`` predicts with.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmray.data.schema import INPUT_IDS, PIXELS, mask_key
from mmray.data.transforms import normalize
from mmray.models.encoders import Encoded

__all__ = ["FusionClassifier", "ModelOutput"]

# {"logits": {task: T}, "aux": {modality: {task: T}}, "masks": {modality: T}, "fused": T [B, fusion.out_dim],
#  "pooled": {modality: T [B, encoder.out_dim]}}: "pooled" is each encoder's own output, before the
# fusion replaces a missing modality's vector (read it with "masks").
ModelOutput = dict[str, dict | Tensor]


class FusionClassifier(nn.Module):
    """Multimodal, multi-task classifier.

    Args:
        encoders: modality key (``schema.TEXT``/``schema.IMAGE``) -> encoder module.
        fusion: module following the fusion contract (``fusion(features, masks) -> Tensor``).
        heads: task name -> head on the fused vector.
        aux_heads: modality -> task -> head on that encoder's pooled vector (may be empty).
        pixel_mean, pixel_std: image normalisation, applied on the device to uint8 pixels.
        modality_dropout: per-sample probability of masking each modality while training (at least
            one modality always stays).
    """

    def __init__(
        self,
        encoders: nn.ModuleDict,
        fusion: nn.Module,
        heads: nn.ModuleDict,
        aux_heads: nn.ModuleDict | None = None,
        pixel_mean: tuple[float, ...] = (0.0, 0.0, 0.0),
        pixel_std: tuple[float, ...] = (1.0, 1.0, 1.0),
        modality_dropout: float = 0.0,
    ):
        super().__init__()
        self.encoders, self.fusion, self.heads = encoders, fusion, heads
        self.aux_heads = aux_heads if aux_heads is not None else nn.ModuleDict()
        self.pixel_mean, self.pixel_std = tuple(pixel_mean), tuple(pixel_std)
        self.modality_dropout = modality_dropout

    def masks(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Modality presence per row (1/0) from the batch; with modality dropout while training."""
        ref = batch[INPUT_IDS] if INPUT_IDS in batch else batch[PIXELS]
        ones = torch.ones(ref.shape[0], device=ref.device)
        masks = {m: batch.get(mask_key(m), ones).float() for m in sorted(self.encoders)}
        if self.training and self.modality_dropout > 0 and len(masks) > 1:
            masks = self._drop_modalities(masks)
        return masks

    def _drop_modalities(self, masks: dict[str, Tensor]) -> dict[str, Tensor]:
        keys = sorted(masks)
        present = torch.stack([masks[k] for k in keys], 1)  # [B, M]
        drop = (torch.rand_like(present) < self.modality_dropout).float()
        kept = present * (1 - drop)
        # Never drop every modality a row has: restore the originals where nothing would be left.
        empty = (kept.sum(1, keepdim=True) == 0).float()
        kept = kept * (1 - empty) + present * empty
        return {k: kept[:, i] for i, k in enumerate(keys)}

    def encode(self, batch: dict[str, Tensor]) -> dict[str, Encoded]:
        """Every encoder's output (uint8 pixels are normalised here, on the batch's device)."""
        if PIXELS in batch and batch[PIXELS].dtype == torch.uint8:
            batch = {**batch, PIXELS: normalize(batch[PIXELS], self.pixel_mean, self.pixel_std)}
        return {m: self.encoders[m](batch) for m in sorted(self.encoders)}

    def predict(self, features: dict[str, Encoded], masks: dict[str, Tensor]) -> dict[str, Tensor]:
        """Task logits from encoder outputs and modality masks (fusion + heads)."""
        return self.classify(self.fusion(features, masks))

    def classify(self, fused: Tensor) -> dict[str, Tensor]:
        """Task logits from the fused vector (the heads)."""
        return {task: head(fused) for task, head in self.heads.items()}

    def aux_logits(self, features: dict[str, Encoded]) -> dict[str, dict[str, Tensor]]:
        """Unimodal logits: modality -> task -> logits from that encoder's pooled vector alone."""
        return {
            m: {t: head(features[m].pooled) for t, head in self.aux_heads[m].items()} for m in sorted(self.aux_heads)
        }

    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        features = self.encode(batch)
        masks = self.masks(batch)
        fused = self.fusion(features, masks)
        return {
            "logits": self.classify(fused),
            "aux": self.aux_logits(features),
            "masks": masks,
            "fused": fused,
            "pooled": {m: features[m].pooled for m in sorted(features)},
        }
