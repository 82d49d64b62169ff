"""``FusionClassifier``: encoders + fusion + one head per task, assembled from supplied parts.

Mirrors torchmultimodal's ``LateFusion``: the model knows nothing about config; ``builder.py`` does.
Optional auxiliary unimodal heads (one per modality and task) read each encoder's pooled output; their
losses (gradient blending, Wang et al. 2020) keep the weaker modality's encoder learning when the
fused head alone would lean on the easier modality. With image-text alignment (``align``, issue 31)
the heads also read each row's aligned cosine similarity beside the fused vector: an interaction such as
"does the caption describe the image" is then one learned threshold away (except under late fusion).

``forward`` = ``encode`` (run every encoder once) + ``masks`` + ``predict`` (fusion + heads), so a
modality ablation re-runs only ``predict`` with other masks (``mmray.score.ablation``; a row without
both modalities reads similarity 0). Its output also carries the representation the heads and the
fusion read (``fused``, and each encoder's ``pooled`` vector), so ``mmray embed`` takes it from the
same forward pass that ``mmray score`` predicts with. With both encoders frozen, training may run on
their outputs computed once (``data.cache=features``): ``with_cached_features`` is the same model
reading them from the batch, with no encoder left to run.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmray.data.schema import IMAGE, INPUT_IDS, PIXELS, TEXT, mask_key
from mmray.data.transforms import normalize
from mmray.models.align import aligned_similarity, hard_negatives, same_rows
from mmray.models.encoders import CachedFeatures, Encoded

__all__ = ["FusionClassifier", "ModelOutput"]

# {"logits": {task: T}, "aux": {modality: {task: T}}, "masks": {modality: T}, "fused": T [B, fusion.out_dim],
#  "pooled": {modality: T [B, encoder.out_dim]}, "aligned": {modality: T [B, projection_dim]},
#  "aligned_scale": T []}: "pooled" is each encoder's own output, before the fusion replaces a missing
# modality's vector (read it with "masks"); "aligned" its unit vector in the aligned space and
# "aligned_scale" the learned inverse temperature (empty and None without an alignment projection).
# "fused" is the fusion's own output, whatever else the heads read.
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
        align: projection of the pooled vectors into a shared space for image-text alignment
            (``AlignProjection``), or None.
        heads_read_similarity: the heads read ``[fused; s]``, ``s`` each row's aligned cosine similarity
            (``aligned_similarity``), so they are ``fusion.out_dim + 1`` wide; needs ``align``.
        match_head: image-text matching head (ALBEF's ITM: one logit, as wide as the task heads' input),
            trained on true pairs and hard negatives (``match``); needs ``align``.
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
        align: nn.Module | None = None,
        heads_read_similarity: bool = False,
        match_head: nn.Module | None = None,
    ):
        super().__init__()
        self.encoders, self.fusion, self.heads = encoders, fusion, heads
        self.aux_heads = aux_heads if aux_heads is not None else nn.ModuleDict()
        self.pixel_mean, self.pixel_std = tuple(pixel_mean), tuple(pixel_std)
        self.modality_dropout = modality_dropout
        if heads_read_similarity and align is None:
            raise ValueError("heads_read_similarity needs an align projection")
        self.align, self.heads_read_similarity = align, heads_read_similarity
        if match_head is not None and align is None:
            raise ValueError("match_head needs an align projection (its negatives come from the alignment)")
        self.match_head = match_head

    def with_cached_features(self) -> FusionClassifier:
        """This model with each encoder replaced by ``CachedFeatures``, which reads the encoder's output
        from the batch. Every other part is this model's own (the same parameters), so training the
        returned model trains this one, which keeps the encoders for checkpoints and scoring."""
        encoders = nn.ModuleDict({m: CachedFeatures(m, e.out_dim, e.token_dim) for m, e in self.encoders.items()})
        return FusionClassifier(
            encoders,
            self.fusion,
            self.heads,
            self.aux_heads,
            self.pixel_mean,
            self.pixel_std,
            self.modality_dropout,
            self.align,
            self.heads_read_similarity,
            self.match_head,
        )

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
        return self.classify(self.fusion(features, masks), self.aligned(features), masks)

    def aligned(self, features: dict[str, Encoded]) -> dict[str, Tensor]:
        """modality -> its pooled vector's unit vector in the aligned space ({} without alignment)."""
        return self.align({m: features[m].pooled for m in sorted(features)}) if self.align is not None else {}

    def classify(self, fused: Tensor, aligned: dict[str, Tensor], masks: dict[str, Tensor]) -> dict[str, Tensor]:
        """Task logits (the heads) from the fused vector and, where the heads read it, the aligned
        similarity of each row (computed with ``masks``: 0 for a row without both modalities)."""
        if self.heads_read_similarity:
            fused = torch.cat([fused, aligned_similarity(aligned, masks).to(fused.dtype)], -1)
        return {task: head(fused) for task, head in self.heads.items()}

    def aux_logits(self, features: dict[str, Encoded]) -> dict[str, dict[str, Tensor]]:
        """Unimodal logits: modality -> task -> logits from that encoder's pooled vector alone."""
        return {
            m: {t: head(features[m].pooled) for t, head in self.aux_heads[m].items()} for m in sorted(self.aux_heads)
        }

    def match(
        self, features: dict[str, Encoded], aligned: dict[str, Tensor], pairs: Tensor, captions: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Image-text matching (ITM) over the true pairs ``pairs`` (``[B]`` bool): (logits, targets).

        Each pair is a positive (target 1); each pair's caption also meets a hard negative image and its
        image a hard negative caption (target 0), drawn by their aligned similarity among the other
        pairs, never one of the same caption (``captions``: token ids; rows with equal ids are one
        caption). Each combination goes through the fusion, as a row with both modalities would.
        """
        rows = pairs.nonzero().squeeze(-1)
        if rows.numel() < 2:  # nothing to contrast; still part of the graph, as DDP wants every parameter
            zero = sum(p.sum() for p in self.match_head.parameters()) * 0.0
            return zero.reshape(1)[:0], zero.reshape(1)[:0].detach()
        with torch.no_grad():
            sim = self.align.scale() * aligned[TEXT][rows] @ aligned[IMAGE][rows].T  # [caption, image]
            same = same_rows(captions[rows]) if captions is not None else torch.eye(len(rows), device=sim.device) > 0
            image_for_caption, caption_for_image = hard_negatives(sim, same), hard_negatives(sim.T, same)
        has_image, has_caption = image_for_caption >= 0, caption_for_image >= 0
        text_rows = torch.cat([rows, rows[has_image], rows[caption_for_image[has_caption]]])
        image_rows = torch.cat([rows, rows[image_for_caption[has_image]], rows[has_caption]])
        combos = {
            TEXT: Encoded(*(t[text_rows] for t in features[TEXT])),
            IMAGE: Encoded(*(t[image_rows] for t in features[IMAGE])),
        }
        both = {m: torch.ones(len(text_rows), device=rows.device) for m in combos}
        fused = self.fusion(combos, both)
        if self.heads_read_similarity:
            pairs_aligned = {TEXT: aligned[TEXT][text_rows], IMAGE: aligned[IMAGE][image_rows]}
            fused = torch.cat([fused, aligned_similarity(pairs_aligned, both).to(fused.dtype)], -1)
        targets = torch.zeros(len(text_rows), device=rows.device)
        targets[: len(rows)] = 1.0
        return self.match_head(fused).squeeze(-1), targets

    def forward(self, batch: dict[str, Tensor], pairs: Tensor | None = None) -> ModelOutput:
        """The model's outputs (``ModelOutput``); with ``pairs`` (``[B]`` bool: rows labelled true
        caption-image pairs, training only) and a matching head, also ``"match"``: (logits, targets) of
        ``match`` over those pairs that have both modalities."""
        features = self.encode(batch)
        masks = self.masks(batch)
        fused = self.fusion(features, masks)
        aligned = self.aligned(features)
        out = {
            "logits": self.classify(fused, aligned, masks),
            "aux": self.aux_logits(features),
            "masks": masks,
            "fused": fused,
            "pooled": {m: features[m].pooled for m in sorted(features)},
            "aligned": aligned,
            "aligned_scale": self.align.scale() if self.align is not None else None,
        }
        if self.match_head is not None and pairs is not None:
            with_both = pairs & (masks[TEXT] > 0) & (masks[IMAGE] > 0)
            out["match"] = self.match(features, aligned, with_both, batch.get(INPUT_IDS))
        return out
