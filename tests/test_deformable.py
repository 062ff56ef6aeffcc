"""Deformable attention against a written-out reference, its gradients, chunking and the published init."""
from __future__ import annotations

import math

import pytest
import torch

from dndetr.config import BackboneConfig
from dndetr.models.backbone import Backbone
from dndetr.models.deformable_attention import SAMPLINGS, MSDeformAttn, deformable_attention_core, radial_offset_bias
from dndetr.models.deformable_transformer import (DeformableDecoderLayer, DeformableEncoder, DeformableEncoderLayer,
                                                  MultiScaleMemory, encoder_proposals, encoder_reference_points,
                                                  flatten_levels, input_projection, level_references, project_levels,
                                                  refine, topk_proposals)
from dndetr.models.multilevel_decoder import MultiLevelDecoderLayer
from dndetr.models.position_encoding import image_position_encoding
from dndetr.models.transformer import ConditionalDecoderLayer

SHAPES = [(5, 7), (3, 4), (2, 2)]


def bilinear_like_kernel(image, x, y):
    """image [D,H,W] (a list of lists of lists); (x, y) in pixels of the CUDA kernel (loc * size - 0.5).
    A point at or beyond one pixel outside the map contributes nothing; outside neighbours count as zero."""
    D, H, W = len(image), len(image[0]), len(image[0][0])
    if not (x > -1 and y > -1 and x < W and y < H):
        return [0.0] * D
    x0, y0 = math.floor(x), math.floor(y)
    out = [0.0] * D
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < H and 0 <= xx < W:
                for d in range(D):
                    out[d] += wy * wx * image[d][yy][xx]
    return out


def reference_attention(module, query, refs, values, shapes, padding_mask):
    """MSDeformAttn.forward written out with explicit loops over batch, queries, heads, levels and points."""
    N, Lq, d = query.shape
    M, L, P = module.n_heads, module.n_levels, module.n_points
    D = d // M
    value = module.value_proj(values).masked_fill(padding_mask[..., None], 0.0)
    offsets = module.sampling_offsets(query).view(N, Lq, M, L, P, 2).tolist()
    logits = module.attention_weights(query).view(N, Lq, M, L * P).tolist()
    starts = [sum(h * w for h, w in shapes[:lvl]) for lvl in range(L)]
    refs = refs.tolist()
    heads_out = torch.zeros(N, Lq, d, dtype=query.dtype)
    for n in range(N):
        # per level and head: image [D][H][W]
        maps = [[[[[value[n, starts[lvl] + i * w + j, m * D + c].item() for j in range(w)] for i in range(h)]
                   for c in range(D)] for m in range(M)] for lvl, (h, w) in enumerate(shapes)]
        for q in range(Lq):
            for m in range(M):
                exp = [math.exp(a) for a in logits[n][q][m]]
                acc = [0.0] * D
                for lvl, (h, w) in enumerate(shapes):
                    ref = refs[n][q][lvl]
                    for p in range(P):
                        dx, dy = offsets[n][q][m][lvl][p]
                        if len(ref) == 2:
                            lx, ly = ref[0] + dx / w, ref[1] + dy / h
                        else:
                            lx, ly = ref[0] + dx / P * ref[2] * 0.5, ref[1] + dy / P * ref[3] * 0.5
                        a = exp[lvl * P + p] / sum(exp)
                        sample = bilinear_like_kernel(maps[lvl][m], lx * w - 0.5, ly * h - 0.5)
                        acc = [s + a * v for s, v in zip(acc, sample)]
                heads_out[n, q, m * D:(m + 1) * D] = torch.tensor(acc, dtype=query.dtype)
    return module.output_proj(heads_out)


def random_case(ref_dim, dtype=torch.float64, seed=0, lq=4):
    gen = torch.Generator().manual_seed(seed)
    module = MSDeformAttn(d_model=8, n_levels=len(SHAPES), n_heads=2, n_points=3).to(dtype)
    with torch.no_grad():  # large random offsets and weights so samples land inside, across borders and outside
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
        module.sampling_offsets.weight.mul_(2.0)
    S = sum(h * w for h, w in SHAPES)
    query = torch.randn(2, lq, 8, generator=gen, dtype=dtype)
    values = torch.randn(2, S, 8, generator=gen, dtype=dtype)
    refs = torch.rand(2, lq, len(SHAPES), ref_dim, generator=gen, dtype=dtype) * 1.2 - 0.1
    if ref_dim == 4:
        refs[..., 2:] = refs[..., 2:].abs() + 0.2
    padding = torch.rand(2, S, generator=gen) < 0.3
    return module, query, refs, values, padding


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("ref_dim", [2, 4])
def test_attention_equals_written_out_reference(ref_dim, sampling):
    module, query, refs, values, padding = random_case(ref_dim)
    module.sampling = sampling
    with torch.no_grad():
        ours = module(query, refs, values, SHAPES, padding)
        expected = reference_attention(module, query, refs, values, SHAPES, padding)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=0)
    assert ours.abs().max() > 0.1  # not a trivially zero output


def test_attention_float32_matches_reference():
    module, query, refs, values, padding = random_case(2, seed=1)
    with torch.no_grad():
        expected = reference_attention(module, query, refs, values, SHAPES, padding)
        ours = module.float()(query.float(), refs.float(), values.float(), SHAPES, padding)
    assert torch.allclose(ours.double(), expected, atol=1e-5, rtol=0)


def core_inputs(seed=0, lq=3):
    gen = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in SHAPES)
    value = torch.randn(1, S, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    locations = (torch.rand(1, lq, 2, len(SHAPES), 2, 2, generator=gen, dtype=torch.float64) * 1.2 - 0.1)
    weights = torch.rand(1, lq, 2, len(SHAPES), 2, generator=gen, dtype=torch.float64)
    return value, locations.requires_grad_(), weights.requires_grad_()


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_gradcheck_value_locations_weights(sampling):
    value, locations, weights = core_inputs()
    assert torch.autograd.gradcheck(lambda v, loc, w: deformable_attention_core(v, SHAPES, loc, w, None, sampling),
                                    (value, locations, weights), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_gradcheck_through_chunks(sampling):
    value, locations, weights = core_inputs(seed=2, lq=5)
    one_query = 2 * 2 * len(SHAPES) * 2 * 8  # heads * head_dim * levels * points * float64 bytes
    assert torch.autograd.gradcheck(
        lambda v, loc, w: deformable_attention_core(v, SHAPES, loc, w, 2 * one_query, sampling),
        (value, locations, weights), eps=1e-6, atol=1e-5)


def test_the_cpu_samples_by_row_sums_from_32_channels_per_head(monkeypatch):
    from dndetr.models import deformable_attention

    calls = []

    def recorded(name):
        return lambda prepared, locations, weights, **_: calls.append(name) or torch.zeros(locations.shape[:2])

    monkeypatch.setattr(deformable_attention, "mix_rows", recorded("rows"))
    monkeypatch.setattr(deformable_attention, "sample_and_mix", recorded("grid_sample"))
    for head_dim in (16, 31, 32, 64):
        value = torch.randn(1, sum(h * w for h, w in SHAPES), 2, head_dim)
        deformable_attention_core(value, SHAPES, torch.rand(1, 3, 2, len(SHAPES), 2, 2),
                                  torch.rand(1, 3, 2, len(SHAPES), 2))
    assert calls == ["grid_sample", "grid_sample", "rows", "rows"]


def test_row_sums_equal_grid_sample_values_and_gradients():
    """The CPU's weighted sum of value rows computes grid_sample's samples, inside, across borders and outside the
    map, for every level, head and image, with the same gradients for all three inputs; and the same values on
    pixel centres, where the sampling has a kink (either one-sided derivative is right there, and the two paths
    round the pixel coordinate differently, so their location gradients may take different sides)."""
    value, locations, weights = core_inputs(seed=4, lq=40)
    assert ((locations < 0) | (locations > 1)).any() and ((locations > 0) & (locations < 1)).any()
    results = []
    for sampling in SAMPLINGS:
        out = deformable_attention_core(value, SHAPES, locations, weights, None, sampling)
        results.append([out] + list(torch.autograd.grad((out * out.detach()).sum(), (value, locations, weights))))
    for rows, grid in zip(*results):
        assert torch.allclose(rows, grid, atol=1e-12, rtol=1e-10)
    assert results[0][0].abs().max() > 0.1 and results[0][2].abs().max() > 0.1
    with torch.no_grad():
        for level, (h, w) in enumerate(SHAPES):
            centres = torch.tensor([[1.5, 0.5], [0.5, 2.5], [2.5, 1.5], [3.5, 0.5]], dtype=locations.dtype)
            locations[0, :4, :, level, 0] = (centres / torch.tensor([w, h]))[:, None]
        on_centres = [deformable_attention_core(value, SHAPES, locations, weights, None, s) for s in SAMPLINGS]
    assert torch.allclose(*on_centres, atol=1e-12, rtol=1e-10)
    with pytest.raises(ValueError, match="sampling='nearest'"):
        deformable_attention_core(value, SHAPES, locations, weights, None, "nearest")


def test_chunked_equals_unchunked_with_gradients():
    module, query, refs, values, padding = random_case(4, dtype=torch.float32, seed=3, lq=7)
    query.requires_grad_()
    full = module(query, refs, values, SHAPES, padding)
    full.square().sum().backward()
    grads = [p.grad.clone() for p in module.parameters()] + [query.grad.clone()]
    module.zero_grad()
    query.grad = None
    module.max_sample_bytes = 1  # one query per chunk
    chunked = module(query, refs, values, SHAPES, padding)
    chunked.square().sum().backward()
    assert torch.allclose(full, chunked, atol=1e-6)
    for before, after in zip(grads, [p.grad for p in module.parameters()] + [query.grad]):
        assert torch.allclose(before, after, atol=1e-5)


def test_bfloat16_autocast_runs_in_float32():
    module, query, refs, values, padding = random_case(2, dtype=torch.float32, seed=4)
    with torch.no_grad():
        exact = module(query, refs, values, SHAPES, padding)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = module(query, refs, values, SHAPES, padding)
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), exact, atol=0.1 * exact.abs().max().item())


def test_published_initialisation():
    module = MSDeformAttn(256, n_levels=4, n_heads=8, n_points=4)
    directions = [(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)]
    expected = torch.tensor([[[[(p + 1) * dx, (p + 1) * dy] for p in range(4)] for _ in range(4)]
                             for dx, dy in directions], dtype=torch.float32).flatten()
    assert module.sampling_offsets.bias.shape == (256,)
    assert torch.allclose(module.sampling_offsets.bias, expected, atol=1e-6)
    assert torch.equal(radial_offset_bias(8, 4, 4), module.sampling_offsets.bias.detach())
    assert not module.sampling_offsets.weight.any()
    assert not module.attention_weights.weight.any() and not module.attention_weights.bias.any()
    for proj in (module.value_proj, module.output_proj):
        assert not proj.bias.any()
        bound = math.sqrt(6 / (256 + 256))  # xavier_uniform
        assert proj.weight.abs().max() <= bound and proj.weight.std() > bound / 3


def test_init_samples_radially_around_a_2d_reference():
    """At init, head m's point p sits (p+1) pixels from the reference along the head's direction, weights 1/16."""
    torch.manual_seed(0)
    module = MSDeformAttn(16, n_levels=1, n_heads=8, n_points=2)
    H, W = 9, 9
    image = torch.arange(H * W, dtype=torch.float32).view(1, H * W, 1).expand(1, H * W, 16)
    with torch.no_grad():  # identity value projection: value channel = pixel index
        module.value_proj.weight.copy_(torch.eye(16))
        module.output_proj.weight.copy_(torch.eye(16))
        centre = torch.tensor([[[[4.5 / W, 4.5 / H]]]])  # the centre of pixel (4, 4)
        out = module(torch.zeros(1, 1, 16), centre, image, [(H, W)])
    head0 = out[0, 0, 0].item()  # head 0 looks along +x: pixels (4,5) and (4,6), weights 1/2 each
    assert head0 == pytest.approx((4 * 9 + 5 + 4 * 9 + 6) / 2)


# -- multi-scale input, encoder, decoder pieces ----------------------------------------------------------------

def padded_batch():
    """Two images in a 64x64 batch: one full, one 40 wide x 64 high (the right 24 columns padded)."""
    images = torch.randn(2, 3, 64, 64)
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[1, :, 40:] = True
    return images, masks


def multiscale_memory(d=32):
    torch.manual_seed(0)
    backbone = Backbone(BackboneConfig(name="resnet18"), layers=["layer2", "layer3", "layer4"])
    proj = input_projection(backbone.channels, d, num_levels=4)
    images, masks = padded_batch()
    levels = project_levels(proj, backbone.levels(images, masks), masks)
    return backbone, proj, levels, flatten_levels(levels, torch.randn(4, d), 10000.0, -0.5)


def test_single_scale_backbone_unchanged():
    backbone = Backbone(BackboneConfig(name="resnet18"))
    features, mask = backbone(*padded_batch())
    assert features.shape == (2, 512, 2, 2) and mask.shape == (2, 2, 2) and backbone.num_channels == 512


def test_multiscale_levels_strides_and_extra_level_from_raw_c5():
    backbone, proj, levels, memory = multiscale_memory()
    assert backbone.channels == [128, 256, 512]
    assert [f.shape[-1] for f, _ in levels] == [8, 4, 2, 1]  # strides 8, 16, 32, 64 on 64 px
    assert all(f.shape[1] == 32 for f, _ in levels)
    assert proj[3][0].in_channels == 512 and proj[3][0].stride == (2, 2)  # reads raw C5, not the projected map
    assert all(isinstance(p[1], torch.nn.GroupNorm) and p[1].num_groups == 32 for p in proj)
    assert memory.shapes == [(8, 8), (4, 4), (2, 2), (1, 1)]
    assert memory.src.shape == (2, 85, 32) and memory.mask.shape == (2, 85)
    # image 1 is 40/64 wide: level 0 keeps 5 of 8 columns
    assert torch.allclose(memory.valid_ratios[1, 0], torch.tensor([5 / 8, 1.0]))
    assert torch.allclose(memory.valid_ratios[0], torch.ones(4, 2))
    assert memory.mask[1, :64].view(8, 8)[:, 5:].all() and not memory.mask[1, :64].view(8, 8)[:, :5].any()


def test_level_embedding_added_per_level():
    _, _, levels, _ = multiscale_memory()
    embed = torch.zeros(4, 32)
    embed[2] = 1.0
    shifted = flatten_levels(levels, embed, 10000.0, -0.5)
    plain = flatten_levels(levels, torch.zeros(4, 32), 10000.0, -0.5)
    diff = shifted.pos - plain.pos
    assert torch.allclose(diff[:, 80:84], torch.ones(2, 4, 32)) and not diff[:, :80].any() and not diff[:, 84:].any()


def test_sine_encoding_offset_puts_pixels_at_their_centres():
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    pos = image_position_encoding(mask, 8, 10000.0, offset=-0.5).view(1, 4, 4, 16)
    # the first y feature is sin(y_normalised): y = (row + 0.5) / 4 * 2 pi
    rows = torch.tensor([0.5, 1.5, 2.5, 3.5]) / (4 + 1e-6) * 2 * math.pi
    assert torch.allclose(pos[0, :, 0, 0], rows.sin(), atol=1e-6)
    plain = image_position_encoding(mask, 8, 10000.0).view(1, 4, 4, 16)
    assert torch.allclose(plain[0, :, 0, 0], (torch.arange(1.0, 5.0) / (4 + 1e-6) * 2 * math.pi).sin(), atol=1e-6)


def test_encoder_reference_points_are_valid_pixel_centres_seen_from_every_level():
    ratios = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.5, 1.0], [0.5, 1.0]]])
    refs = encoder_reference_points([(2, 4), (1, 2)], ratios)
    assert refs.shape == (2, 10, 2, 2)
    assert torch.allclose(refs[0, :4, 0], torch.tensor([[0.125, 0.25], [0.375, 0.25], [0.625, 0.25], [0.875, 0.25]]))
    # padded image: normalised by the valid width (x / 0.5) then scaled back by the level's ratio (x 0.5)
    assert torch.allclose(refs[1, :4, 0], refs[0, :4, 0])
    assert torch.allclose(refs[1, 8:, 1], torch.tensor([[0.25, 0.5], [0.75, 0.5]]))


def test_encoder_and_decoder_layers_run_and_ignore_padded_values():
    _, _, _, memory = multiscale_memory()
    encoder = DeformableEncoder(DeformableEncoderLayer(32, 64, 0.0, "relu", 4, 4, 2), 2).eval()
    out = encoder(memory)
    assert out.shape == memory.src.shape and torch.isfinite(out).all()
    changed = memory._replace(src=memory.src.masked_fill(memory.mask[..., None], 123.0))
    # the padded tokens' values never reach a valid token (their value rows are zeroed before sampling)
    valid = ~memory.mask
    assert torch.allclose(encoder(changed)[valid], out[valid], atol=1e-5)

    layer = DeformableDecoderLayer(32, 4, 64, 0.0, "relu", 4, 2).eval()
    refs = level_references(torch.rand(2, 5, 4), memory.valid_ratios)
    assert refs.shape == (2, 5, 4, 4)
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[:2, 2:] = True
    hs = layer(torch.randn(2, 5, 32), torch.randn(2, 5, 32), refs, out, memory.shapes, memory.mask, mask)
    assert hs.shape == (2, 5, 32) and torch.isfinite(hs).all()


def test_refine_2d_reference_moves_centre_only():
    delta = torch.tensor([[0.3, -0.2, 1.0, -1.0]])
    box = refine(delta, torch.tensor([[0.5, 0.25]]))
    assert torch.allclose(box[0, 2:], delta[0, 2:].sigmoid())
    assert torch.allclose(box[0, :2], torch.tensor([0.3, -0.2 + math.log(1 / 3)]).sigmoid())
    four = refine(delta, torch.tensor([[0.5, 0.5, 0.5, 0.5]]))
    assert torch.allclose(four, delta.sigmoid())


def test_encoder_proposals_sizes_and_invalid_tokens():
    mask = torch.zeros(1, 4 * 4 + 2 * 2, dtype=torch.bool)
    mask[0, 15] = True  # the last pixel of level 0 (the first row and column stay valid: valid size 4 x 4)
    memory, logits = encoder_proposals(torch.ones(1, 20, 8), mask, [(4, 4), (2, 2)])
    boxes = logits.sigmoid()
    assert torch.allclose(boxes[0, 5], torch.tensor([0.375, 0.375, 0.05, 0.05]))
    assert torch.allclose(boxes[0, 16 + 3], torch.tensor([0.75, 0.75, 0.1, 0.1]))
    assert torch.isinf(logits[0, 15]).all() and not memory[0, 15].any()
    assert torch.isfinite(logits[0, 0]).all() and memory[0, 0].all()
    outside = encoder_proposals(torch.ones(1, 1, 8), torch.zeros(1, 1, dtype=torch.bool), [(1, 1)], base_size=0.995)
    assert torch.isinf(outside[1]).all() and not outside[0].any()  # a box size beyond 0.99 is invalid


def test_topk_proposals_detached_by_score():
    coords = torch.arange(12.0).view(1, 3, 4).requires_grad_()
    picked = topk_proposals(torch.tensor([[0.1, 0.9, 0.5]]), coords, 2)
    assert torch.equal(picked, torch.tensor([[[4.0, 5, 6, 7], [8, 9, 10, 11]]])) and not picked.requires_grad


# -- the dense multi-level decoder layer of the "deformable encoder only" variant --------------------------------

def as_memory(tokens, shapes):
    return MultiScaleMemory(tokens, None, None, shapes, None)


def conditional_twin(layer):
    """A conditional decoder layer with the same weights whose cross-attention output projection = ca_out_v_proj."""
    twin = ConditionalDecoderLayer(32, 4, 64, 0.0, "relu", first=layer.ca_qpos_proj is not None).eval()
    state = {k: v for k, v in layer.state_dict().items() if not k.startswith(("ca_out_v_proj", "lvl_attn"))}
    state.update({"cross_attn.out_proj." + k: v for k, v in layer.ca_out_v_proj.state_dict().items()})
    twin.load_state_dict(state, strict=True)
    return twin


def test_multilevel_layer_with_one_level_is_the_conditional_layer():
    torch.manual_seed(0)
    layer = MultiLevelDecoderLayer(32, 4, 64, 0.0, "relu", first=True, n_levels=1).eval()
    twin = conditional_twin(layer)
    tgt, query_pos, query_sine = torch.randn(2, 5, 32), torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    memory, pos = torch.randn(2, 12, 32), torch.randn(2, 12, 32)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[1, 8:] = True
    out = layer(tgt, as_memory(memory, [(3, 4)]), mask, pos, query_pos, query_sine)
    assert torch.allclose(out, twin(tgt, memory, mask, pos, query_pos, query_sine), atol=1e-5)


def test_multilevel_layer_mixes_levels_by_learned_weights():
    torch.manual_seed(1)
    layer = MultiLevelDecoderLayer(32, 4, 64, 0.0, "relu", first=False, n_levels=2).eval()
    twin = conditional_twin(layer)
    tgt, query_pos, query_sine = torch.randn(1, 3, 32), torch.randn(1, 3, 32), torch.randn(1, 3, 32)
    memory, pos = torch.randn(1, 6 + 2, 32), torch.randn(1, 8, 32)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    with torch.no_grad():  # all weight on level 1: the layer sees only the last 2 tokens
        layer.lvl_attn.weight.zero_()
        layer.lvl_attn.bias.copy_(torch.tensor([-50.0, 50.0]))
    out = layer(tgt, as_memory(memory, [(2, 3), (1, 2)]), mask, pos, query_pos, query_sine)
    only_level1 = twin(tgt, memory[:, 6:], mask[:, 6:], pos[:, 6:], query_pos, query_sine)
    assert torch.allclose(out, only_level1, atol=1e-5)
    with torch.no_grad():  # equal weights: differs from either level alone
        layer.lvl_attn.bias.zero_()
    assert not torch.allclose(layer(tgt, as_memory(memory, [(2, 3), (1, 2)]), mask, pos, query_pos, query_sine),
                              only_level1, atol=1e-3)


def test_multilevel_layer_survives_an_all_padding_level():
    layer = MultiLevelDecoderLayer(32, 4, 64, 0.0, "relu", first=True, n_levels=2).eval()
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 6:] = True  # level 1 is all padding for this image
    out = layer(torch.randn(1, 3, 32), as_memory(torch.randn(1, 8, 32), [(2, 3), (1, 2)]), mask,
                torch.randn(1, 8, 32), torch.randn(1, 3, 32), torch.randn(1, 3, 32))
    assert torch.isfinite(out).all()
