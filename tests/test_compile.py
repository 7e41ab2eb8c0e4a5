"""torch.compile of an EDL model in training: one graph, no graph break, no recompile per layer or
per optimizer step, the step size kept in step with the weights, and the same steps as eager."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from edl_timm.layers import edl_layers, fit_step_sizes

from conftest import TINY


def sgd_steps(net, params, x, y, steps):
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_compiled_training_is_one_graph_without_recompiles_and_matches_eager():
    torch.manual_seed(0)
    model = timm.create_model("edl_resnet18", num_classes=10, **TINY).train()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    fit_step_sizes(model, x[:1])  # what the first eager training forward does, before compiling
    eager = copy.deepcopy(model)
    before = [m.step_size.clone() for _, m in edl_layers(model)]

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # a graph break raises
    first = sgd_steps(compiled, model.parameters(), x, y, 1)
    # so does a recompile from here on (dynamo's own patch: monkeypatch's undo deletes the option)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled_losses = first + sgd_steps(compiled, model.parameters(), x, y, 2)
    # (the optimizer is rebuilt above, as is eager's below: both lose their momentum alike)
    eager_losses = sgd_steps(eager, eager.parameters(), x, y, 1) + sgd_steps(eager, eager.parameters(), x, y, 2)

    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-5)
    for (name, c), (_, e), old in zip(edl_layers(model), edl_layers(eager), before):
        # the optimizer step post-hook refreshed the compiled model's step sizes as eager's forward does
        assert not torch.equal(c.step_size, old), name
        torch.testing.assert_close(c.step_size, e.step_size, rtol=1e-5, atol=0)
    for (name, a), b in zip(model.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)


def test_a_deep_copy_keeps_its_step_size_in_step_with_its_weight():
    """A copy's weight has a fresh version counter: the copy must neither refresh a step size that
    fits its weight (one more power iteration would move it) nor keep one that does not."""
    from edl_timm.layers import EDLConv2d

    torch.manual_seed(0)
    layer = EDLConv2d(3, 8, 3, padding=1).train()
    x = torch.rand(2, 3, 16, 16)
    layer(x)  # refreshed at x's size
    copied = copy.deepcopy(layer)
    layer(x), copied(x)
    assert torch.equal(copied.step_size, layer.step_size)
    with torch.no_grad():
        layer.weight.add_(torch.randn_like(layer.weight))  # the weight changes; nothing has refreshed: the copy is stale too
    stale = copy.deepcopy(layer)
    layer(x), stale(x)
    assert torch.equal(stale.step_size, layer.step_size)
    assert not torch.allclose(layer.step_size, copied.step_size, rtol=1e-3)  # both did refresh
