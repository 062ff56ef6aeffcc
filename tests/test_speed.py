"""The speed paths keep the results: batched matching of all layers, the CPU dropout, the attention module, and
the channels_last backbone."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dndetr.config import BackboneConfig, LossConfig, MatcherConfig
from dndetr.matcher import HungarianMatcher
from dndetr.models.backbone import Backbone
from dndetr.models.transformer import (Dropout, MultiheadAttention, attention, dropout, fast_dropout_applies,
                                       keep_mask, keep_probability)


def layer_outputs(num_layers: int, batch: int, queries: int, classes: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [{"pred_logits": torch.randn(batch, queries, classes, generator=gen),
             "pred_boxes": torch.rand(batch, queries, 4, generator=gen) * 0.5 + 0.25} for _ in range(num_layers)]


def boxes_and_labels(counts, classes: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [{"labels": torch.randint(0, classes, (n,), generator=gen),
             "boxes": torch.rand(n, 4, generator=gen) * 0.5 + 0.25} for n in counts]


@pytest.mark.parametrize("class_loss", ["ce", "focal"])
@pytest.mark.parametrize("counts", [(3, 0, 5), (0, 0, 0), (1, 7, 2)])
def test_match_layers_equals_per_layer_matching(class_loss, counts):
    matcher = HungarianMatcher(MatcherConfig(), LossConfig(class_loss=class_loss, giou_eps=1e-6))
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
    matcher = HungarianMatcher(MatcherConfig(), LossConfig())
    layers = layer_outputs(num_layers=3, batch=2, queries=5, classes=4)
    layers[1]["pred_boxes"][0, 2, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite matching cost"):
        matcher.match_layers(layers, boxes_and_labels((2, 3), classes=4))


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_mask_keeps_each_element_with_probability_one_minus_p(p, dtype):
    torch.manual_seed(0)
    x = torch.empty(1001, 999, dtype=dtype)  # element count not a multiple of 4: the last random word is part used
    mask = keep_mask(x, p)
    assert mask.shape == x.shape and mask.dtype == dtype
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert keep_probability(p) == 1 - round(p * 2 ** 16) / 2 ** 16 and abs(keep_probability(p) - (1 - p)) <= 2 ** -17
    flat = mask.flatten().float()
    lanes = [flat[i:flat.numel() - 3:4] for i in range(4)]
    sigma = (p * (1 - p) / lanes[0].numel()) ** 0.5
    # Each of the four 16-bit lanes of a random word is unbiased, and no two are the same bits.
    for lane in lanes:
        assert abs(lane.mean().item() - keep_probability(p)) < 5 * sigma
    for a, b in zip(lanes, lanes[1:]):
        assert (a != b).float().mean().item() == pytest.approx(2 * p * (1 - p), abs=0.01)


@pytest.mark.parametrize("p", [1e-6, 1 - 1e-6])
def test_dropout_rates_that_round_to_zero_or_one_use_torchs_dropout(p):
    x = torch.ones(4096)
    assert not fast_dropout_applies(x, p)
    torch.manual_seed(0)
    ours = dropout(x, p, training=True)
    torch.manual_seed(0)
    assert torch.equal(ours, F.dropout(x, p, training=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_zeroes_or_rescales_and_passes_gradients_through_the_kept_elements(dtype):
    torch.manual_seed(0)
    x = (torch.rand(64, 300) + 0.5).to(dtype).requires_grad_()
    y = dropout(x, 0.25, training=True)
    assert y.dtype == dtype
    kept = y != 0
    scale = 1 / keep_probability(0.25)
    assert abs(kept.float().mean().item() - 0.75) < 0.02
    # Kept elements are scaled exactly as x * (1 / (1 - p)) would be in x's dtype (not by a rounded mask value).
    assert torch.equal(y[kept], (x * scale)[kept])
    y.sum().backward()
    assert torch.equal(x.grad, (kept.to(dtype) * scale).to(dtype))
    assert dropout(x, 0.25, training=False) is x
    module = Dropout(0.25).eval()
    assert module(x) is x


def reference_attention(d: int, nheads: int) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(d, nheads, batch_first=True)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_()  # non-zero biases too, so a misplaced bias slice would show
    return reference


@pytest.mark.parametrize("self_attention", [True, False])
def test_multihead_attention_matches_torch_with_masks(self_attention):
    d, nheads = 16, 4
    reference = reference_attention(d, nheads)
    ours = MultiheadAttention(d, nheads, dropout=0.0)
    assert sorted(ours.state_dict()) == sorted(reference.state_dict())  # the official key layout
    ours.load_state_dict(reference.state_dict())
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(2, 5, d, generator=gen)
    key = query if self_attention else torch.randn(2, 7, d, generator=gen)
    value = torch.randn(2, key.shape[1], d, generator=gen)
    padding = torch.zeros(2, key.shape[1], dtype=torch.bool)
    padding[1, -2:] = True
    attn_mask = torch.zeros(5, key.shape[1], dtype=torch.bool)
    attn_mask[0, 1] = attn_mask[3, 0] = True
    expected = reference(query, key, value, key_padding_mask=padding, attn_mask=attn_mask, need_weights=False)[0]
    assert torch.allclose(ours(query, key, value, attn_mask=attn_mask, padding_mask=padding), expected, atol=1e-5)


def test_cpu_dropout_attention_path_computes_what_sdpa_computes():
    """With a probability too small to drop anything, the explicit path (used for dropout > 0 on the CPU) must give
    SDPA's result, masks included."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 6, 16, generator=gen), torch.randn(2, 9, 16, generator=gen), torch.randn(2, 9, 8,
                                                                                                     generator=gen)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[0, -3:] = True
    attn_mask = torch.zeros(6, 9, dtype=torch.bool)
    attn_mask[2, :4] = True
    smallest = 2 ** -16  # the smallest rate that takes the explicit path; with this seed nothing is dropped
    assert fast_dropout_applies(q, smallest)
    torch.manual_seed(0)
    explicit = attention(q, k, v, 4, smallest, attn_mask, padding)
    fused = attention(q, k, v, 4, 0.0, attn_mask, padding)
    assert explicit.shape == (2, 6, 8) and torch.allclose(explicit, fused * (1 + 2 ** -16), atol=1e-5)
    assert not torch.allclose(explicit, fused, rtol=1e-6, atol=0)  # the explicit path ran: its 1 / (1 - p) shows



def test_bf16_attention_on_the_cpu_takes_the_explicit_products(monkeypatch):
    """Under CPU bf16 autocast, attention without dropout is two bf16 products and a softmax, not torch's fused
    kernel (slower here in bf16 and in fp32): bf16 out, close to the fp32 attention, gradients for every input."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 16, generator=gen).bfloat16().requires_grad_() for n in (6, 9, 9))
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, -4:] = True
    attn_mask = torch.zeros(6, 9, dtype=torch.bool)
    attn_mask[2, :4] = True
    expected = attention(q.float(), k.float(), v.float(), 4, 0.0, attn_mask, padding)  # fp32: the fused kernel

    def fused(*args, **kwargs):
        raise AssertionError("the fused kernel ran")
    monkeypatch.setattr(F, "scaled_dot_product_attention", fused)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, 4, 0.0, attn_mask, padding)
    assert out.dtype == torch.bfloat16 and out.shape == expected.shape
    assert torch.allclose(out.float(), expected, atol=3e-2, rtol=3e-2)
    assert not torch.equal(out, expected.bfloat16())  # computed in bf16, not fp32 rounded at the end
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (q, k, v))
    with pytest.raises(AssertionError, match="fused kernel"):  # fp32 still takes the fused kernel
        attention(q.float(), k.float(), v.float(), 4, 0.0, attn_mask, padding)


def test_attention_dropout_drops_attention_weights_at_rate_p():
    """Uniform attention over identical values of 1: each output is the kept fraction of the row / (1 - p)."""
    torch.manual_seed(0)
    q, k = torch.zeros(1, 200, 8), torch.zeros(1, 400, 8)
    out = attention(q, k, torch.ones(1, 400, 8), nheads=1, dropout_p=0.3)
    assert out.mean().item() == pytest.approx(1.0, abs=0.01)
    assert out.std().item() > 0.01  # rows differ: weights were dropped, not the output rescaled


def test_channels_last_backbone_gives_the_same_features():
    torch.manual_seed(0)
    backbone = Backbone(BackboneConfig(name="resnet18"), channels_last=True).eval()
    weight = backbone.body.conv1.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    images, masks = torch.randn(2, 3, 64, 96), torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[1, :, 64:] = True
    with torch.no_grad():
        nhwc, nhwc_mask = backbone(images, masks)
        backbone.set_channels_last(False)
        assert backbone.body.conv1.weight.is_contiguous()
        nchw, nchw_mask = backbone(images, masks)
    assert torch.equal(nhwc_mask, nchw_mask) and nhwc.shape == nchw.shape == (2, 512, 2, 3)
    assert torch.allclose(nhwc, nchw, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_stem_pools_before_its_relu_with_torchvisions_values_and_gradients(precision):
    torch.manual_seed(0)
    ours = Backbone(BackboneConfig(name="resnet18", frozen_bn=False, trainable_layers=5, output_layer="layer2"))
    assert list(ours.body.named_children())[1:4] == [("bn1", ours.body.bn1), ("maxpool", ours.body.maxpool),
                                                     ("relu", ours.body.relu)]
    reference = copy.deepcopy(ours.body)  # the same modules, run in torchvision's order
    torchvision_order = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2"]
    images = torch.randn(2, 3, 64, 80).contiguous(memory_format=torch.channels_last)
    results = []
    for forward, modules in ((lambda x: ours.body(x)["0"], ours.body),
                             (lambda x: nn.Sequential(*(reference[n] for n in torchvision_order))(x), reference)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            features = forward(images)
        (features.float() * torch.linspace(-1, 1, features.numel()).view_as(features)).sum().backward()
        results.append([features.detach(), *(p.grad for p in modules.parameters()), *modules.buffers()])
    assert len(results[0]) == len(results[1]) > 40
    for ours_value, reference_value in zip(*results):
        assert torch.equal(ours_value, reference_value)


def test_frozen_batch_norm_keeps_bf16_and_is_torchvisions_in_fp32():
    """Our frozen norm: torchvision's buffers and fp32 values (bitwise, gradients too), but a bf16 autocast input
    stays bf16 (torchvision's fp32 statistics promote it to fp32), within bf16 rounding of the fp32 result."""
    from torchvision.ops import FrozenBatchNorm2d as TorchvisionFrozen

    from dndetr.models.backbone import FrozenBatchNorm2d

    torch.manual_seed(0)
    ours, reference = FrozenBatchNorm2d(16), TorchvisionFrozen(16)
    for name, buffer in ours.named_buffers():
        buffer.copy_(torch.rand_like(buffer) + 0.5 if name.endswith(("weight", "var")) else torch.randn_like(buffer))
    reference.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(reference.state_dict())
    x = torch.randn(2, 16, 6, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
    outputs, grads = [], []
    for module in (ours, reference):
        out = module(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outputs.append(out.detach())
        grads.append(x.grad.clone())
        x.grad = None
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(grads[0], grads[1])
    assert outputs[0].is_contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = torch.nn.Conv2d(16, 16, 1)(x)
        assert half.dtype == torch.bfloat16 and reference(half).dtype == torch.float32
        ours_half = ours(half)
    assert ours_half.dtype == torch.bfloat16
    torch.testing.assert_close(ours_half.float(), reference(half.float()), rtol=2e-2, atol=2e-2)
    assert ours(x.detach().half()).dtype == torch.float32  # fp16 keeps torchvision's fp32 result (range)


def test_backbone_uses_the_dtype_keeping_frozen_norm():
    from dndetr.models.backbone import FrozenBatchNorm2d

    backbone = Backbone(BackboneConfig(name="resnet18", frozen_bn=True, output_layer="layer2"))
    norms = [m for m in backbone.modules() if "BatchNorm" in type(m).__name__]
    assert norms and all(type(m) is FrozenBatchNorm2d for m in norms)


def test_benchmark_flop_count_includes_fused_cpu_attention():
    """The roofline columns of benchmarks/bench_step.py count SDPA's fused CPU kernels, forward and backward."""
    from benchmarks.common import count_flops

    q, k, v = (torch.randn(2, 4, n, 8, requires_grad=True) for n in (6, 10, 10))
    forward = 2 * (2 * 4 * 6 * 10 * 8) * 2  # q k^T and weights @ v, 2 FLOPs per multiply-add
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == forward
    # torch's backward formula: the scores recomputed plus four gradient products, 5 products to the forward's 2.
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward()) == forward * 7 // 2


@pytest.mark.parametrize("class_loss", ["ce", "focal"])
def test_criterion_batched_matching_gives_the_per_layer_losses(class_loss):
    """The criterion matches the last layer and the aux layers in one batched pass; every loss term must equal
    the one computed with one matcher call per layer."""
    from dndetr.criterion import SetCriterion

    loss = LossConfig(class_loss=class_loss, giou_eps=1e-6)
    criterion = SetCriterion(HungarianMatcher(MatcherConfig(), loss), num_classes=5, cfg=loss)
    layers = layer_outputs(num_layers=3, batch=3, queries=7, classes=6 if class_loss == "ce" else 5)
    outputs = dict(layers[-1], aux_outputs=layers[:-1])
    targets = boxes_and_labels((2, 0, 4), classes=5)
    calls = []
    batched_match = criterion.matcher.match_layers
    criterion.matcher.match_layers = lambda ls, ts: calls.append(len(ls)) or batched_match(ls, ts)
    batched = criterion(outputs, targets)
    assert calls == [3]  # one batched matching for all three layers
    criterion.matcher.match_layers = lambda ls, ts: [criterion.matcher(layer, ts) for layer in ls]
    per_layer = criterion(outputs, targets)
    assert sorted(batched) == sorted(per_layer) and len(batched) == 9
    for name in batched:
        assert torch.equal(batched[name], per_layer[name]), name


def reference_layer_losses(criterion, out, targets, indices, num_boxes):
    """One layer's Hungarian losses written out image by image with torch's and torchvision's per-layer
    reductions (the criterion's form before it computed all layers at once)."""
    from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

    logits, boxes = out["pred_logits"], out["pred_boxes"]
    image = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)])
    query = torch.cat([q for q, _ in indices])
    labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
    target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
    classes = torch.full(logits.shape[:2], criterion.num_classes, dtype=torch.int64)
    classes[image, query] = labels
    if criterion.cfg.class_loss == "ce":
        class_term = F.cross_entropy(logits.transpose(1, 2), classes, criterion.empty_weight)
    else:
        onehot = F.one_hot(classes, criterion.num_classes + 1)[..., :-1].float()
        class_term = sigmoid_focal_loss(logits, onehot, criterion.cfg.focal_alpha, criterion.cfg.focal_gamma,
                                        "sum") / num_boxes
    pred = boxes[image, query]
    xyxy = lambda b: box_convert(b, "cxcywh", "xyxy")  # noqa: E731
    giou = generalized_box_iou(xyxy(pred), xyxy(target_boxes)).diagonal()
    return {"loss_ce": class_term, "loss_bbox": F.l1_loss(pred, target_boxes, reduction="sum") / num_boxes,
            "loss_giou": (1 - giou).sum() / num_boxes}


@pytest.mark.parametrize("class_loss", ["ce", "focal", "stable"])
@pytest.mark.parametrize("counts", [(2, 0, 4), (0, 0, 0), (9, 1, 3)])
def test_all_layers_losses_at_once_equal_each_layer_alone(class_loss, counts):
    """The criterion computes every layer's terms in one set of ops; each must equal that layer's loss computed
    alone: the per-layer formulas for CE and focal, the one-layer form for Stable-DINO's loss (whose per-image
    rescaling must stay within a layer). 9 targets against 7 queries: some objects stay unmatched."""
    from dndetr.criterion import SetCriterion

    loss = LossConfig(class_loss=class_loss, giou_eps=0.0)
    criterion = SetCriterion(HungarianMatcher(MatcherConfig(), loss), num_classes=5, cfg=loss)
    layers = layer_outputs(num_layers=3, batch=3, queries=7, classes=6 if class_loss == "ce" else 5)
    targets = boxes_and_labels(counts, classes=5)
    indices = criterion.matcher.match_layers(layers, targets)
    together = criterion.layers_matching_losses(layers, targets, 4.0, indices)
    assert len(together) == 3
    for out, layer_indices, values in zip(layers, indices, together):
        if class_loss == "stable":
            alone = criterion.layers_matching_losses([out], targets, 4.0, [layer_indices])[0]
        else:
            alone = reference_layer_losses(criterion, out, targets, layer_indices, 4.0)
        assert sorted(values) == ["loss_bbox", "loss_ce", "loss_giou"]
        for term, value in values.items():
            assert value.shape == () and torch.allclose(value, alone[term], rtol=1e-5, atol=1e-6), term
    if class_loss == "stable" and sum(counts):  # the one-layer form against a layer of its own, rescaled alone
        first = criterion.layers_matching_losses(layers[:1], targets, 4.0, indices[:1])[0]["loss_ce"]
        assert torch.allclose(together[0]["loss_ce"], first) and not torch.allclose(together[1]["loss_ce"], first)


def test_bench_dn_runs_and_times_the_plugin_step(tmp_path):
    """benchmarks/bench_dn.py on a tiny input: it must find the DN plug-in's functions it times (it once patched
    a module they had left) and report every group count."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_dn", root / "benchmarks" / "bench_dn.py")
    bench = importlib.util.module_from_spec(spec)
    threads = torch.get_num_threads()
    sys.path.insert(0, str(root))
    try:
        spec.loader.exec_module(bench)
        out = tmp_path / "dn.json"
        bench.main(["--size", "64", "--groups", "2", "--repeats", "1", "--warmup", "0", "--threads", "1",
                    "--json", str(out)])
    finally:
        sys.path.remove(str(root))
        torch.set_num_threads(threads)
    rows = json.loads(out.read_text())["result"]["rows"]
    assert [r["groups"] for r in rows] == [0, 2]
    assert rows[0]["dn_bookkeeping_s"] == 0 and rows[1]["dn_bookkeeping_s"] > 0  # the DN functions were timed
    assert rows[1]["dn_queries"] == 2 * 9 and all(r["step_s"] > 0 for r in rows)
    # the 18 DN queries add decoder work: counted FLOPs grow, and the no-DN row is the reference
    assert rows[0]["flops_vs_no_dn"] == 1 and rows[1]["flops"] > rows[0]["flops"] > 0


@pytest.mark.slow  # six tiny train.py processes: about a minute
def test_bench_default_job_times_a_commit_and_this_checkout(tmp_path):
    """The before/after benchmark of the default job runs end to end (tiny runs) and reports every epoch."""
    import json
    import subprocess
    import sys

    from helpers import REPO_ROOT, tiny

    if subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout: --before needs the repository's history")
    def worktrees():
        listing = subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "list"], capture_output=True, text=True)
        return listing.stdout.splitlines()

    worktrees_before = worktrees()  # a killed earlier run may have left one behind: only this run's count
    out = tmp_path / "job.json"
    result = subprocess.run([sys.executable, "benchmarks/bench_default_job.py", "--before", "HEAD", "--precision",
                             "fp32,bf16", "--rounds", "2", "--epochs", "1", "--json", str(out),
                             *[o for o in tiny(tmp_path) if not o.startswith(("trainer.epochs", "trainer.precision"))]],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    variants = json.loads(out.read_text())["variants"]
    assert list(variants) == ["before HEAD", "now fp32", "now bf16"]
    for row in variants.values():
        assert len(row["train_time"]) == 2 and all(t > 0 for t in row["train_time"])
        assert row["mean"] == pytest.approx(sum(row["train_time"]) / 2)
    for row in variants.values():  # the wait is measured from outside, for any commit
        assert len(row["data_time"]) == 2 and all(0 < d < t for d, t in zip(row["data_time"], row["train_time"]))
        assert row["step_mean"] == pytest.approx(row["mean"] - sum(row["data_time"]) / 2)
        # this checkout records its own wait around the same next() calls: the two agree
        assert all(abs(d - r) <= 0.01 + 0.1 * r for d, r in zip(row["data_time"], row["recorded_data_time"]))
    assert variants["before HEAD"]["speedup_vs_first"] == variants["before HEAD"]["step_speedup_vs_first"] == 1.0
    assert worktrees() == worktrees_before  # the temporary checkout is removed


def run_benchmark(tmp_path, script: str, *args: str, timeout: int = 300) -> dict:
    """Run ``benchmarks/<script>`` as a user would, with ``--json``; its JSON output."""
    import json
    import subprocess
    import sys

    from helpers import REPO_ROOT

    out = tmp_path / "result.json"
    result = subprocess.run([sys.executable, f"benchmarks/{script}", *args, "--json", str(out)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(out.read_text())


def test_bench_attention_times_every_shape_and_variant(tmp_path):
    rows = run_benchmark(tmp_path, "bench_attention.py", "--repeats", "1", "--warmup", "0", "--threads", "1")
    rows = rows["attention"]
    assert len(rows) == 7
    for times in rows.values():
        assert set(times) == {"SDPA fp32", "SDPA bf16", "SDPA fp32 on bf16 inputs", "ours, bf16 autocast"}
        assert all(t > 0 for t in times.values())


def test_bench_dropout_times_ours_against_torch_and_the_boolean_mask(tmp_path):
    rows = run_benchmark(tmp_path, "bench_dropout.py", "--repeats", "1", "--warmup", "0", "--threads", "1")["dropout"]
    assert len(rows) == 8 and sum(name.endswith("bfloat16") for name in rows) == 4
    for times in rows.values():
        assert set(times) == {"torch F.dropout", "ours", "ours, mask through torch.where"}
        assert all(t > 0 for t in times.values())


def test_bench_backbone_times_our_layout_and_stem_against_the_replaced_ones(tmp_path):
    results = run_benchmark(tmp_path, "bench_backbone.py", "--repeats", "2", "--warmup", "0", "--batch", "2",
                            "--size", "64", "--threads", "1")["backbone"]
    assert list(results) == ["fp32", "bf16"]
    for rows in results.values():
        assert len(rows) == 3 and all(row["median_s"] > 0 for row in rows.values())
        assert next(iter(rows.values()))["vs_ours"] == 1.0


def test_bench_optimizer_times_both_optimizers_on_equal_copies(tmp_path):
    rows = run_benchmark(tmp_path, "bench_optimizer.py", "--models", "detr", "--precision", "fp32", "--repeats", "1",
                         "--warmup", "1", "--size", "64", "--threads", "1")["optimizer"]
    assert list(rows) == ["detr fp32"]
    row = rows["detr fp32"]
    assert row["torch_s"] > 0 and row["ours_s"] > 0 and row["ours_over_torch"] == row["ours_s"] / row["torch_s"]


def test_bench_block_attention_steps_both_forms_of_the_blocks_attention(tmp_path):
    """The dense arm really runs the masked attention over all queries: its step counts more FLOPs than the
    part-by-part step of the same model, which counts more than the model without blocks."""
    result = run_benchmark(tmp_path, "bench_block_attention.py", "--settings", "none,dn 10 groups", "--repeats", "1",
                           "--warmup", "0", "--size", "64", "--threads", "1")["block_attention"]
    rows = {(r["setting"], r["form"]): r for r in result["rows"]}
    assert list(rows) == [("none", "parts"), ("dn 10 groups", "parts"), ("dn 10 groups", "dense")]
    parts, dense, alone = rows["dn 10 groups", "parts"], rows["dn 10 groups", "dense"], rows["none", "parts"]
    assert dense["flops"] > parts["flops"] > alone["flops"] > 0
    assert parts["queries"] == dense["queries"] == alone["queries"] + 10 * 9  # 9: the batch's largest image
    assert parts["parts_vs_dense"] > 0 and dense["parts_vs_dense"] is None and alone["step_vs_none"] == 1


def test_bench_deformable_attention_times_the_row_sums_against_grid_sample(tmp_path):
    rows = run_benchmark(tmp_path, "bench_deformable_attention.py", "--sizes", "64", "--repeats", "1", "--warmup",
                         "0", "--threads", "1")["rows"]
    assert [r["kind"] for r in rows] == ["encoder", "decoder"]
    for row in rows:
        assert min(row["unchunked_s"], row["chunked_s"], row["rows_s"], row["grid_sample_s"]) > 0
        assert row["rows_vs_grid_sample"] > 0
        # grid_sample keeps its samples for the backward; the row sums keep corner indices and weights only
        assert row["grid_sample_saved_mib"] > row["rows_saved_mib"] == row["unchunked_saved_mib"] > 0


def test_bench_deformable_attention_steps_whole_models_with_each_sampling(tmp_path):
    rows = run_benchmark(tmp_path, "bench_deformable_attention.py", "--whole-steps", "--sizes", "64", "--precision",
                         "bf16", "--repeats", "2", "--warmup", "0", "--threads", "1")["whole_steps"]
    assert [(r["model"], r["precision"]) for r in rows] == [("deformable", "bf16")]
    row = rows[0]
    assert row["attention_modules"] == 12  # 6 encoder and 6 decoder layers of the bench config
    paired = sorted(r / g for r, g in zip(row["rows_all_s"], row["grid_sample_all_s"]))
    assert len(paired) == 2 and row["rows_vs_grid_sample"] == pytest.approx(sum(paired) / 2)


def test_profile_ops_reports_each_ops_self_time_per_call():
    from benchmarks.common import profile_ops, shared_share

    a, b, bias = torch.randn(64, 32), torch.randn(32, 16), torch.randn(16)
    x, y = torch.randn(3, 8, 5), torch.randn(3, 5, 7)
    ops, matmuls = profile_ops(lambda: ((a @ b).relu(), torch.addmm(bias, a, b), a @ b, torch.bmm(x, y)), calls=3)
    assert ops["aten::mm"] > 0 and ops["aten::clamp_min"] > 0
    assert "aten::conv2d" not in ops
    # the matmuls by operand shapes: mm twice per call, addmm (its bias not an operand) and bmm once; 2 m k n each
    found = {(row["op"], str(row["shapes"])): row for row in matmuls["by_shape"]}
    expected = {("aten::mm", "[[64, 32], [32, 16]]"): (2, 2 * 2 * 64 * 32 * 16),
                ("aten::addmm", "[[16], [64, 32], [32, 16], [], []]"): (1, 2 * 64 * 32 * 16),
                ("aten::bmm", "[[3, 8, 5], [3, 5, 7]]"): (1, 2 * 3 * 8 * 5 * 7)}
    assert set(found) == set(expected)
    for key, (calls, flops) in expected.items():
        assert found[key]["calls"] == calls and found[key]["flops"] == flops
        assert found[key]["flop_per_s"] == pytest.approx(flops / found[key]["s"])
    assert matmuls["flops"] == sum(flops for _, flops in expected.values())
    assert matmuls["s"] == pytest.approx(ops["aten::mm"] + ops["aten::addmm"] + ops["aten::bmm"])
    # ours spends 2 s in each of a and b; the peer runs a (1 s) and c, not b: 1 of our 4 s is shared
    assert shared_share({"a": 2.0, "b": 2.0}, {"a": 1.0, "c": 5.0}) == 0.25
    assert shared_share({"a": 1.0}, {"a": 3.0}) == 1.0


def run_gpu_script(tmp_path, **settings):
    import os
    import subprocess
    import sys

    from helpers import REPO_ROOT

    env = dict(os.environ, PYTHON=sys.executable, **settings)
    return subprocess.run(["bash", "benchmarks/gpu.sh", str(tmp_path / "results")], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_gpu_script_refuses_a_machine_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the script would run")
    result = run_gpu_script(tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert "sees no CUDA device" in result.stderr and not (tmp_path / "results").exists()


@pytest.mark.slow
def test_gpu_script_writes_every_benchmark(tmp_path):
    """The GPU script's plumbing, tried on the CPU at toy sizes: each benchmark's JSON with images per second."""
    import json

    pytest.importorskip("transformers", reason="transformers (in the test extra) is not installed: "
                                               "pip install -e .[test]")
    result = run_gpu_script(tmp_path, BENCH_DEVICE="cpu", BENCH_SIZE="64", BENCH_BATCH="2", BENCH_REPEATS="1",
                            BENCH_WARMUP="0", BENCH_DEFORMABLE_SIZES="64")
    assert result.returncode == 0, result.stderr[-2000:]
    folder = tmp_path / "results"
    step = json.loads((folder / "step.json").read_text())
    assert step["environment"]["device"] == "cpu"
    models = step["results"]["models"]
    assert {m["model"] for m in models} == {"detr", "conditional", "dab", "deformable"}
    for model in models:
        assert [(v["precision"], v["dropout"], v["layout"]) for v in model["variants"]] == [
            ("fp32", "matched", "shipped"), ("bf16", "matched", "shipped")]
        for row in model["variants"]:
            assert row["step_ours_images_per_s"] == pytest.approx(2 / row["step_ours_s"])
    dn = json.loads((folder / "dn.json").read_text())
    assert dn["args"]["precision"] == "bf16" and dn["args"]["size"] == 64
    deformable = json.loads((folder / "deformable_attention.json").read_text())
    assert [r["kind"] for r in deformable["rows"]] == ["encoder", "decoder"]
