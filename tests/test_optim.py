"""The optimizer (dndetr/optim.py): torch's fused AdamW, bitwise, without copies of channels_last weights."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dndetr.optim import AdamW, contiguous_views


def small_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                        nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    return net.to(memory_format=torch.channels_last)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_is_bitwise_torchs_fused_adamw_with_channels_last_weights(amsgrad, monkeypatch):
    seen = []  # per call of the fused kernel: were all its tensors contiguous (i.e. nothing for it to copy)?
    kernel = torch._fused_adamw_

    def recording_kernel(*tensor_lists, **kwargs):
        seen.append(all(t.is_contiguous() for tensors in tensor_lists if tensors for t in tensors))
        return kernel(*tensor_lists, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", recording_kernel)
    ours_net, torch_net = small_net(), small_net()
    assert ours_net[0].weight.is_contiguous(memory_format=torch.channels_last)
    settings = dict(lr=1e-2, weight_decay=1e-4, amsgrad=amsgrad)
    ours = AdamW([{"params": list(ours_net[:2].parameters()), "lr": 3e-3}, {"params": list(ours_net[2:].parameters())}],
                 **settings)
    reference = torch.optim.AdamW([{"params": list(torch_net[:2].parameters()), "lr": 3e-3},
                                   {"params": list(torch_net[2:].parameters())}], fused=True, **settings)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        images = torch.randn(2, 3, 6, 6, generator=gen).contiguous(memory_format=torch.channels_last)
        for net, optimizer in ((ours_net, ours), (torch_net, reference)):
            optimizer.zero_grad(set_to_none=True)
            net(images).square().sum().backward()
            optimizer.step()
        assert seen[-4:] == [True, True, False, True]  # ours, then torch's (the 3x3 weight, group 1)
    assert ours_net[0].weight.grad.is_contiguous(memory_format=torch.channels_last)  # the path under test ran
    for (name, mine), theirs in zip(ours_net.named_parameters(), torch_net.parameters()):
        assert torch.equal(mine, theirs), name
        assert mine.is_contiguous(memory_format=torch.channels_last) == theirs.is_contiguous(
            memory_format=torch.channels_last)
    assert str(ours.state_dict()) == str(reference.state_dict())


def test_contiguous_views_share_memory_and_only_when_every_role_is_channels_last():
    weight = torch.randn(4, 3, 3, 3).contiguous(memory_format=torch.channels_last)
    grad, moment = torch.randn_like(weight), torch.zeros_like(weight)  # like: channels_last too
    plain_grad = torch.randn(4, 3, 3, 3)  # a contiguous gradient for a channels_last weight: left alone
    bias = torch.randn(4)
    params, grads, moments = [weight, weight, bias], [grad, plain_grad, bias.clone()], [moment, moment.clone(),
                                                                                         bias.clone()]
    originals = [list(params), list(grads), list(moments)]
    contiguous_views([params, grads, moments])
    assert params[0].is_contiguous() and params[0].shape == (4, 3, 3, 3)
    assert params[0].data_ptr() == weight.data_ptr() and grads[0].data_ptr() == grad.data_ptr()
    assert torch.equal(params[0], weight.permute(0, 2, 3, 1))
    for role, before in zip((params, grads, moments), originals):
        assert role[1] is before[1] and role[2] is before[2]


def test_adamw_loads_the_state_of_torchs_class():
    """Checkpoints written with torch.optim.AdamW resume into ours."""
    net = small_net()
    reference = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
    net(torch.randn(1, 3, 6, 6)).sum().backward()
    reference.step()
    ours = AdamW(copy.deepcopy(net).parameters(), lr=1e-3)
    ours.load_state_dict(reference.state_dict())
    assert str(ours.state_dict()) == str(reference.state_dict())
    assert ours.param_groups[0]["fused"] is True

