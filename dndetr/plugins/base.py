"""The query plug-in interface: extra decoder queries that exist only in training, with their own loss.

A plug-in (DN-DETR's denoising, and successors such as Group DETR or hybrid matching) builds, from the targets, one
block of extra decoder queries (content [B,P,d] + the model's positional query), says which other queries the block
may see in the decoder's self-attention, and computes its own loss terms on the block's outputs. The shared forward
pass (models/base.py) and the criterion call plug-ins through this interface only, so several can be on at once:
each block gets its own slice of the query axis and the visibility rules are composed (:func:`attention_parts`).

The rule that keeps inference unchanged: the matching queries never see a block unless the block says so
(``seen_by_matching``, DN without its attention mask), so at evaluation, when no block is built, the matching
queries compute exactly what they computed in training.

A plug-in's parameters are created under their own random generator (:func:`isolated_init`), so two runs that
differ only in a plug-in share the initial values of every parameter they have in common. A plug-in that needs more
of the model's matching queries (Group DETR's extra groups, H-DETR's one-to-many branch) makes them in ``attach``
once the model exists (``model.new_query_rows``) and turns them into queries with ``model.queries(B, rows)``;
blocks of extra matching queries are scored with :func:`matching_block_losses`. Query-axis order:
[DN | matching queries (group 0) | Group DETR groups 1..K-1 | one-to-many], the plug-ins' registration order.
"""
from __future__ import annotations

import contextlib
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..rng import cpu_seeded

PLUGINS: Dict[str, type] = {}


def register_plugin(cls: type) -> type:
    """Class decorator: ``cls.group`` is the plug-in's config group (and its name), ``cls.schema`` its dataclass."""
    PLUGINS[cls.group] = cls
    return cls


@contextlib.contextmanager
def isolated_init(name: str) -> Iterator[None]:
    """Draw initial values from a generator seeded by (run seed, name) and leave the global RNG as it was."""
    seed = (torch.initial_seed() * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)
    with cpu_seeded(seed):
        yield


@dataclass
class QueryBlock:
    """One plug-in's extra queries for one batch and which queries its rows may see in self-attention."""

    plugin: "QueryPlugin"
    content: torch.Tensor  # [B, P, d]
    position: Dict[str, torch.Tensor]  # the model's positional query, each [B, P, ...]
    groups: int = 1  # the block's rows are this many equal groups that do not see each other (group-major)
    sees_matching: bool = True  # the block's rows may attend to the matching queries
    seen_by_matching: bool = False  # the matching queries may attend to this block (breaks train/eval equality)
    before_matching: bool = True  # where the block sits on the query axis
    meta: dict = field(default_factory=dict)  # whatever the plug-in's loss needs (targets, slots, ...)
    logits: Optional[torch.Tensor] = None  # [L, B, P, K], filled by the forward pass
    boxes: Optional[torch.Tensor] = None  # [L, B, P, 4]

    @property
    def size(self) -> int:
        return self.content.shape[1]


class QueryPlugin(nn.Module, ABC):
    group: str = ""  # config group and loss-term prefix (DN: dn)
    schema: type = object
    needs_box_queries = False  # the model must turn boxes into positional queries (``box_query_position``)

    @staticmethod
    @abstractmethod
    def enabled(cfg) -> bool:
        """Whether this configuration turns the plug-in on (off means: no module, no parameters, no RNG draws)."""

    def attach(self, model) -> None:
        """Called once the model exists (under this plug-in's own generator): a plug-in that needs more of the
        model's matching queries makes their parameters here (``model.new_query_rows``)."""

    @property
    def matching_loss_scale(self) -> float:
        """Factor on the criterion's own (matching-query) loss terms; Group DETR averages them over its groups."""
        return 1.0

    def adjust_matching(self, content: torch.Tensor, position: Dict[str, torch.Tensor]):
        """Change the matching queries (training and inference alike); default: unchanged."""
        return content, position

    def probe(self, content: torch.Tensor, model) -> Optional[QueryBlock]:
        """A block to run in eval mode when the matching recorder asks for it (``instability.groups``); default none."""
        return None

    @abstractmethod
    def build(self, targets: List[dict], content: torch.Tensor, model) -> Optional[QueryBlock]:
        """The block of extra queries for this batch (training only); None for no block."""

    @abstractmethod
    def loss(self, block: QueryBlock, targets: List[dict], criterion, num_layers: int) -> Dict[str, torch.Tensor]:
        """Weighted loss terms on the block's outputs of the last ``num_layers`` decoder layers, named without
        the plug-in's prefix (``loss_ce``, ``loss_bbox_0``, ...)."""


def attach_plugins(plugins: nn.ModuleDict, model) -> None:
    for group, plugin in plugins.items():
        with isolated_init(f"plugin:{group}:attach"):
            plugin.attach(model)


def build_plugins(cfg, num_classes: int, hidden_dim: int) -> nn.ModuleDict:
    plugins = nn.ModuleDict()
    for group, cls in PLUGINS.items():
        plugin_cfg = getattr(cfg, group, None)
        if plugin_cfg is not None and cls.enabled(plugin_cfg):
            with isolated_init(f"plugin:{group}"):
                plugins[group] = cls(plugin_cfg, num_classes, hidden_dim)
    return plugins


def layer_suffixes(total_layers: int, num_layers: int) -> List[Tuple[int, str]]:
    """(layer index, loss-term suffix) of the last ``num_layers`` decoder layers: ``_i`` for aux layers, none last."""
    return [(layer, "" if layer == total_layers - 1 else f"_{layer}")
            for layer in range(total_layers - num_layers, total_layers)]


def matching_block_losses(block: QueryBlock, targets: List[dict], criterion, num_layers: int, num_boxes: float,
                          scale: float, copies: int = 1) -> Dict[str, torch.Tensor]:
    """Hungarian losses of a block of extra matching queries, layer by layer. With ``copies`` > 1 the block holds
    that many equal-sized groups, each matched one-to-one to the image's targets on its own (Group DETR)."""
    terms = {}
    batch_size = block.logits.shape[1]
    stacked = [t for t in targets for _ in range(copies)]  # image b, group g -> row b * copies + g
    supervised = layer_suffixes(block.logits.shape[0], num_layers)
    layers = [{"pred_logits": block.logits[layer].reshape(batch_size * copies, -1, block.logits.shape[-1]),
               "pred_boxes": block.boxes[layer].reshape(batch_size * copies, -1, 4)} for layer, _ in supervised]
    for (_, suffix), values in zip(supervised, criterion.layers_matching_losses(layers, stacked, num_boxes)):
        terms.update({term + suffix: value * criterion.weights[term] * scale for term, value in values.items()})
    return terms


def assemble(blocks: List[QueryBlock], content: torch.Tensor, position: Dict[str, torch.Tensor]):
    """Concatenate [blocks before | matching | blocks after] on the query axis; returns content, position, the
    self-attention's parts (:func:`attention_parts`; None when nothing is blocked) and the matching queries' slice."""
    before = [b for b in blocks if b.before_matching]
    after = [b for b in blocks if not b.before_matching]
    start = sum(b.size for b in before)
    matching = slice(start, start + content.shape[1])
    content = torch.cat([b.content for b in before] + [content] + [b.content for b in after], dim=1)
    position = {key: torch.cat([b.position[key] for b in before] + [value] + [b.position[key] for b in after], dim=1)
                for key, value in position.items()}
    return content, position, attention_parts(before + after, matching), matching


def block_slices(blocks: List[QueryBlock], matching: slice) -> List[Tuple[QueryBlock, slice]]:
    before = [b for b in blocks if b.before_matching]
    after = [b for b in blocks if not b.before_matching]
    slices, offset = [], 0
    for b in before:
        slices.append((b, slice(offset, offset + b.size)))
        offset += b.size
    offset = matching.stop
    for b in after:
        slices.append((b, slice(offset, offset + b.size)))
        offset += b.size
    return slices


@dataclass(frozen=True)
class AttentionPart:
    """Consecutive rows of a block-structured self-attention: cut into ``groups`` equal groups, a row sees the rows
    of its own group and the rows in ``also_sees``, nothing else (the training-time query blocks' rules)."""

    rows: slice
    groups: int = 1
    also_sees: Tuple[slice, ...] = ()


def blocked_by_parts(parts: Tuple[AttentionPart, ...], total: int, device=None) -> torch.Tensor:
    """The dense [T, T] mask of ``parts`` (True = blocked), for checks and for the masked form of the attention."""
    allowed = torch.zeros(total, total, dtype=torch.bool, device=device)
    for part in parts:
        start, stop = part.rows.start, part.rows.stop
        size = (stop - start) // part.groups
        for group in range(start, stop, size):
            allowed[group:group + size, group:group + size] = True
        for seen in part.also_sees:
            allowed[part.rows, seen] = True
    return ~allowed


def is_open(block: QueryBlock) -> bool:
    """Seen by and seeing the matching queries, in one group: visible to every query."""
    return block.sees_matching and block.seen_by_matching and block.groups == 1


def attention_parts(blocks: List[QueryBlock], matching: slice) -> Optional[Tuple[AttentionPart, ...]]:
    """The self-attention's rules as parts in query-axis order: matching rows see the matching queries (and blocks
    ``seen_by_matching``); a block's rows see their own group and, if ``sees_matching``, the matching queries; an
    open block (:func:`is_open`) is seen by every query. None when nothing is blocked."""
    spans = [(block, rows) for block, rows in block_slices(blocks, matching) if block.size]
    for block, _ in spans:
        if block.groups < 1 or block.size % block.groups:
            raise ValueError(f"{block.plugin.group}: a block of {block.size} queries cannot be {block.groups} "
                             f"equal groups")
    if all(is_open(block) for block, _ in spans):
        return None
    open_rows = [rows for block, rows in spans if is_open(block)]
    parts = [AttentionPart(matching, 1, tuple(rows for block, rows in spans if block.seen_by_matching))]
    for block, rows in spans:
        seen = ([matching] if block.sees_matching else []) + [other for other in open_rows if other != rows]
        parts.append(AttentionPart(rows, block.groups, tuple(seen)))
    return tuple(sorted(parts, key=lambda part: part.rows.start))


def split_outputs(blocks: List[QueryBlock], matching: slice, logits: torch.Tensor, boxes: torch.Tensor):
    """Give each block its slice of the [L, B, T, ...] outputs; return the matching queries' part."""
    for block, rows in block_slices(blocks, matching):
        block.logits, block.boxes = logits[:, :, rows], boxes[:, :, rows]
    return logits[:, :, matching], boxes[:, :, matching]


def with_plugin_queries(model, content: torch.Tensor, position: Dict[str, torch.Tensor], targets, probe=False):
    """The forward pass's plug-in step: every plug-in's block around the matching queries (training with targets;
    with ``probe``, the plug-ins' probe blocks of the matching record). Returns content, position, the
    self-attention mask and ``blocks`` (with the matching slice) for :func:`outputs_of_plugins`; without blocks the
    queries come back unchanged."""
    blocks = []
    if model.training and targets is not None:
        blocks = [block for plugin in model.plugins.values()
                  if (block := plugin.build(targets, content, model)) is not None]
    elif probe:
        blocks = [block for plugin in model.plugins.values() if (block := plugin.probe(content, model)) is not None]
    if not blocks:
        return content, position, None, None
    content, position, self_attn_mask, matching = assemble(blocks, content, position)
    return content, position, self_attn_mask, (blocks, matching)


def outputs_of_plugins(blocks, logits: torch.Tensor, boxes: torch.Tensor, outputs: dict):
    """Give the blocks their outputs (``outputs["query_blocks"]``); returns the matching queries' logits, boxes."""
    if blocks is None:
        return logits, boxes
    outputs["query_blocks"] = blocks[0]
    return split_outputs(*blocks, logits, boxes)

