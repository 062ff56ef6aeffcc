"""Query denoising (DN-DETR), training only, for any model that implements ``dn_position``.

Ground-truth objects are copied into ``groups`` groups, each copy gets its own box noise (centre shift within
lambda1*w/2, size scaled within (1 +- lambda2)) and label flipping; the noised label is embedded as the content
query (plus an indicator bit = 1), the noised box becomes the model's positional query. DN queries come first,
padded per group to the batch's largest object count; the self-attention mask keeps matching queries from seeing
them and groups from seeing each other. Their outputs are split off before matching and trained to reconstruct
the clean boxes and labels at every decoder layer.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import DNConfig


class Denoising(nn.Module):
    def __init__(self, cfg: DNConfig, num_classes: int, hidden_dim: int):
        super().__init__()
        self.cfg, self.num_classes = cfg, num_classes
        # Row num_classes is the "unknown" label: the content of every matching query (as in DN-DAB-DETR).
        self.label_enc = nn.Embedding(num_classes + 1, hidden_dim - 1)

    def matching_content(self) -> torch.Tensor:
        unknown = self.label_enc.weight[self.num_classes]
        return torch.cat((unknown, unknown.new_zeros(1)))  # indicator 0: a matching query

    def noise(self, labels: torch.Tensor, boxes: torch.Tensor):
        flip = torch.rand(labels.shape, device=labels.device) < self.cfg.label_noise
        random_labels = torch.randint(0, self.num_classes, labels.shape, device=labels.device)
        labels = torch.where(flip, random_labels, labels)
        wh = boxes[:, 2:]
        span = torch.cat((wh / 2 * self.cfg.lambda1, wh * self.cfg.lambda2), dim=1)
        boxes = boxes + (torch.rand_like(boxes) * 2 - 1) * span
        return labels, boxes.clamp(0, 1)

    def prepare(self, targets, content, position, dn_position):
        """Prepend the DN queries to the matching queries; returns (content, position, self-attention mask, meta)."""
        groups, batch_size, num_matching = self.cfg.groups, content.shape[0], content.shape[1]
        counts = [len(t["labels"]) for t in targets]
        per_group = max(counts, default=0)
        pad_size = per_group * groups
        device = content.device
        labels = torch.cat([t["labels"] for t in targets]).repeat(groups)
        boxes = torch.cat([t["boxes"] for t in targets]).repeat(groups, 1)
        image = torch.cat([torch.full((n,), b, device=device) for b, n in enumerate(counts)]).long().repeat(groups)
        within = torch.cat([torch.arange(n, device=device) for n in counts]).long()
        slot = (within[None] + per_group * torch.arange(groups, device=device)[:, None]).flatten()

        noised_labels, noised_boxes = self.noise(labels, boxes)
        # Padding slots: zero content (indicator 0) and the centred box (0.5, 0.5, 0.5, 0.5); never supervised.
        dn_content = content.new_zeros(batch_size, pad_size, content.shape[-1])
        dn_content = dn_content.index_put((image, slot), torch.cat(
            (self.label_enc(noised_labels), content.new_ones(len(slot), 1)), dim=1))
        dn_boxes = content.new_full((batch_size, pad_size, 4), 0.5).index_put((image, slot), noised_boxes)
        dn_pos = dn_position(dn_boxes)
        content = torch.cat((dn_content, content), dim=1)
        position = {key: torch.cat((dn_pos[key], value), dim=1) for key, value in position.items()}

        mask = None
        if self.cfg.attn_mask and pad_size > 0:
            group_of = torch.arange(pad_size + num_matching, device=device) // max(per_group, 1)
            group_of[pad_size:] = groups  # the matching part is its own group
            # True = blocked: matching rows see no DN column, DN groups see only themselves and the matching part.
            mask = (group_of[:, None] != group_of[None, :]) & (torch.arange(pad_size + num_matching,
                                                                            device=device)[None, :] < pad_size)
        meta = {"pad_size": pad_size, "image": image, "slot": slot, "labels": labels, "boxes": boxes}
        return content, position, mask, meta

    @staticmethod
    def split(logits: torch.Tensor, boxes: torch.Tensor, meta: dict):
        """[L,B,P+N,...] -> the matching part [L,B,N,...] and the DN outputs (with what the loss needs)."""
        pad = meta["pad_size"]
        dn = dict(meta, logits=logits[:, :, :pad], pred_boxes=boxes[:, :, :pad])
        return (logits[:, :, pad:], boxes[:, :, pad:]), dn
