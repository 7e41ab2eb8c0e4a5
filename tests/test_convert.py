"""edl_timm.convert on timm's own models and a user's model."""
import pytest
import timm
import torch
import torch.nn as nn

from edl_timm import EDLConv2d, EDLLinear, convert, is_edl_layer


def edl_names(model):
    return sorted(n for n, m in model.named_modules() if is_edl_layer(m))


def test_converted_timm_vit_small_has_the_edl_vit_parameters():
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224")
    converted = convert(vit)
    edl = timm.create_model("edl_vit_small_patch16_224")
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes(converted) == shapes(edl)
    assert edl_names(converted) == edl_names(edl)
    # plain weights kept value by value, under the same keys
    plain = vit.state_dict()
    for k, v in converted.state_dict().items():
        if k in plain:
            assert torch.equal(v, plain[k]), k
    # and a plain vit_small checkpoint loads into the EDL model strictly
    edl.load_state_dict(plain)
    assert torch.equal(edl.blocks[0].mlp.fc1.weight, vit.blocks[0].mlp.fc1.weight)


def test_default_rule_on_resnet50_and_convnext():
    r50 = convert(timm.create_model("resnet50"))
    for name, m in r50.named_modules():
        if isinstance(m, nn.Conv2d):
            assert is_edl_layer(m) == (max(m.kernel_size) > 1), name
    assert not is_edl_layer(r50.fc)
    cnx = convert(timm.create_model("convnext_tiny"))
    names = edl_names(cnx)
    assert "stem.0" in names and "stages.0.blocks.0.conv_dw" in names and "stages.0.blocks.0.mlp.fc1" in names
    assert "stages.0.blocks.0.mlp.fc2" not in names and "head.fc" not in names


def test_copy_by_default_in_place_on_request():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
    converted = convert(model, mode="vanilla", num_iters=3)
    assert type(model[0]) is nn.Conv2d, "the caller's model is untouched"
    assert isinstance(converted[0], EDLConv2d) and converted[0].num_iters == 3 and converted[0].mode == "vanilla"
    assert type(converted[2]) is nn.Conv2d
    same = convert(model, inplace=True)
    assert same is model and isinstance(model[0], EDLConv2d)


def test_include_and_exclude_patterns():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
            self.proj = nn.Linear(8, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.proj(self.features(x).mean((2, 3))))

    net = Net()
    assert edl_names(convert(net, exclude="features.1")) == ["features.0"]
    assert edl_names(convert(net, include=["features.*", "proj"])) == ["features.0", "features.1", "proj"]
    assert isinstance(convert(net, include="proj").proj, EDLLinear)
    with pytest.raises(ValueError, match="matched no nn.Conv2d or nn.Linear module; module names look like"):
        convert(net, include="backbone.*")
    with pytest.raises(ValueError, match="valid modes are elastic, vanilla, robust, none"):
        convert(net, mode="lasso")
    assert edl_names(convert(net, mode="none")) == []


def test_conv2d_subclasses_are_not_converted_silently():
    from timm.layers import Conv2dSame

    model = nn.Sequential(Conv2dSame(3, 4, 3, stride=2))
    assert edl_names(convert(model)) == []
    with pytest.raises(TypeError, match="is not a plain nn.Conv2d"):
        convert(model, include="0")


@pytest.mark.parametrize("name,size", [("resnet50", 64), ("convnext_tiny", 64), ("vit_small_patch16_224", 224)])
def test_converted_models_train(name, size):
    torch.manual_seed(0)
    kwargs = dict(depth=2) if "vit" in name else {}
    model = convert(timm.create_model(name, num_classes=5, **kwargs)).train()
    x = torch.randn(4, 3, size, size)
    y = torch.tensor([0, 1, 2, 3])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = []
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
