"""The edl_* architectures behave as timm's model test-suite demands of a timm model."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import edl_timm
from edl_timm import EDLConv2d, EDLLinear, hub, is_edl_layer
from edl_timm.convert import EDL_ARG_NAMES, edl_layer_defaults

# small sizes on CPU: each family's own code paths, fewer or narrower blocks
SMALL = {
    "edl_preact_resnet18": dict(channels=(16, 32, 64, 128)),
    "edl_resnet18": {},
    "edl_resnet34": {},
    "edl_resnet50": {},
    "edl_wide_resnet28_10": dict(widen_factor=1),
    "edl_wide_resnet34_10": dict(widen_factor=1),
    "edl_vit_tiny_patch4_32": dict(depth=3),
    "edl_vit_small_patch16_224": dict(depth=3),
}
ARCHS = sorted(SMALL)
CNNS = [a for a in ARCHS if "vit" not in a]


def create(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, **dict(SMALL[name], **kwargs))


def sample_input(model, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *model.pretrained_cfg["input_size"], generator=g)


def test_registry_lists_every_architecture():
    assert set(timm.list_models("edl_*")) == set(ARCHS)
    for name in ARCHS:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.paper_ids == "arXiv:2502.00834"
        assert cfg.license and cfg.first_conv and cfg.classifier and cfg.mean and cfg.std
        # weights come only from hub_configs/ (each with its release folder: tests/test_releases.py)
        shipped = {c["architecture"]: c["hf_hub_id"] for c in hub.load_hub_configs() if c.get("default")}
        assert (cfg.hf_hub_id or None) == shipped.get(name) and not (cfg.url or cfg.file), name


@pytest.mark.parametrize("name", [a for a in ARCHS if a not in {c["architecture"] for c in hub.load_hub_configs()}])
def test_pretrained_without_weights_is_a_clear_error(name):
    with pytest.raises(RuntimeError, match=f"no pretrained weights are published for '{name}'.*local-dir"):
        timm.create_model(name, pretrained=True, **SMALL[name])


@pytest.mark.parametrize("name", ARCHS)
def test_eval_forward_is_finite_and_deterministic(name):
    model = create(name).eval()
    x = sample_input(model)
    with torch.no_grad():
        out = model(x)
        again = model(x)
    assert out.shape == (2, model.pretrained_cfg["num_classes"])
    assert torch.isfinite(out).all()
    assert torch.equal(out, again)


@pytest.mark.parametrize("name", ARCHS)
def test_backward_reaches_every_parameter(name):
    model = create(name, num_classes=42).train()
    out = model(sample_input(model))
    assert out.shape == (2, 42)
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ARCHS)
def test_grad_checkpointing_gives_the_same_output_and_gradients(name):
    x = sample_input(create(name))
    results = []
    for checkpointing in (False, True):
        model = create(name).train()
        model.set_grad_checkpointing(checkpointing)
        out = model(x)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b)
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], msg=n)


@pytest.mark.parametrize("name", ARCHS)
def test_forward_features_and_head_shapes(name):
    model = create(name).eval()
    x = sample_input(model)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
    if "vit" in name:
        assert feats.shape[-1] == model.num_features
    else:
        assert feats.shape[1] == model.num_features
        assert tuple(feats.shape[-2:]) == tuple(model.pretrained_cfg["pool_size"])
    assert pre.shape == (2, model.head_hidden_size)


@pytest.mark.parametrize("name", ARCHS)
def test_classifier_reset_and_unpooled_output(name):
    model = create(name).eval()
    x = sample_input(model)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, model.num_features)
    model.reset_classifier(0, "")
    with torch.no_grad():
        out = model(x)
    unpooled_dims = 3 if "vit" in name else 4
    assert out.dim() == unpooled_dims
    bare = create(name, num_classes=0, global_pool="").eval()
    with torch.no_grad():
        assert bare(x).dim() == unpooled_dims


@pytest.mark.parametrize("name", ARCHS)
def test_first_conv_and_classifier_name_state_dict_keys(name):
    model = create(name)
    keys = model.state_dict().keys()
    cfg = model.pretrained_cfg
    assert f"{cfg['first_conv']}.weight" in keys
    assert f"{cfg['classifier']}.weight" in keys
    assert is_edl_layer(model.get_submodule(cfg["first_conv"])), "the stem / patch embedding is EDL"


@pytest.mark.parametrize("name", ARCHS)
def test_features_only_matches_feature_info_and_forward_intermediates(name):
    model = create(name).eval()
    features = create(name, features_only=True).eval()  # same seed: same weights
    x = sample_input(model)
    with torch.no_grad():
        feats = features(x)
        inter = model.forward_intermediates(x, indices=features.feature_info.out_indices, intermediates_only=True)
    assert len(feats) >= 3
    chans, reds = features.feature_info.channels(), features.feature_info.reduction()
    assert len(inter) == len(feats)
    for f, i, c, r in zip(feats, inter, chans, reds):
        assert f.shape[1] == c
        assert f.shape[-1] == x.shape[-1] // r
        torch.testing.assert_close(f, i)


@pytest.mark.parametrize("name", ARCHS)
def test_channels_last_gives_the_same_output(name):
    model = create(name).eval()
    x = sample_input(model)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ARCHS)
def test_torchscript_and_fx(name):
    """TorchScript runs the eager solver (close); an fx graph, plain or timm's feature extractor,
    runs each EDL layer whole and equals the module bit for bit, in eval and in training mode
    (where both refresh the step size the same way)."""
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names

    model = create(name).eval()
    x = sample_input(model)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), ref)
        assert torch.equal(torch.fx.symbolic_trace(model)(x), ref)
        last = get_graph_node_names(model)[0][-1]
        assert torch.equal(create_feature_extractor(model, return_nodes=[last])(x)[last], ref)
    traced = torch.fx.symbolic_trace(copy.deepcopy(model)).train()
    model.train()
    assert torch.equal(traced(x), model(x))


@pytest.mark.slow
# The ViT only. The convolutional families' compiled training (forward, backward and optimizer steps
# in one graph, matched to eager) is test_compile.py's, on a narrow edl_resnet18 with the same stem,
# blocks, downsampling and EDL layers: the full-width copy here cost 92 s of CI's 30 minutes for no
# other path. The WideResNet's EDL layers are the ResNet's; its eager forward and backward are in
# timm's suite (test_timm_suite.py).
@pytest.mark.parametrize("name", ["edl_vit_tiny_patch4_32"])
def test_torch_compile(name):
    model = create(name).train()
    x = sample_input(model)
    compiled = torch.compile(model)
    compiled(x).mean().backward()  # a training step compiles (forward and backward)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ARCHS)
def test_mode_none_is_the_plain_twin(name):
    edl = create(name)
    plain = create(name, mode="none")
    assert not any(is_edl_layer(m) for m in plain.modules())
    n_edl = sum(is_edl_layer(m) for m in edl.modules())
    assert n_edl >= 3
    # same parameters but for the EDL layers' beta
    edl_shapes = {k: v.shape for k, v in edl.named_parameters() if not k.endswith("beta_logit")}
    assert edl_shapes == {k: v.shape for k, v in plain.named_parameters()}
    assert plain.edl_cfg == {"mode": "none"}


def test_edl_arguments_pass_through_and_are_recorded():
    model = timm.create_model("edl_resnet18", mode="vanilla", num_iters=3, lam=0.05, eps=0.01, nonneg=False)
    layers = [m for m in model.modules() if is_edl_layer(m)]
    assert len(layers) == 17  # stem + 16 3x3 convolutions; the 3 downsample 1x1 convs stay plain
    assert all(
        (l.mode, l.num_iters, l.lam, l.eps, l.nonneg) == ("vanilla", 3, 0.05, 0.01, False) for l in layers
    )
    # the given arguments and every default, so that a saved config rebuilds exactly these layers
    given = dict(num_iters=3, lam=0.05, eps=0.01, nonneg=False)
    assert model.edl_cfg == dict(mode="vanilla", **{**edl_layer_defaults(), **given})
    assert set(edl_layer_defaults()) == set(EDL_ARG_NAMES)
    # the recorded defaults are the ones the layers were built with
    assert all((l.normalize_input, l.normalize_atoms) == (model.edl_cfg["normalize_input"], model.edl_cfg["normalize_atoms"])
               for l in layers)
    assert all(type(m) is nn.Conv2d and m.kernel_size == (1, 1) for m in model.modules() if type(m) is nn.Conv2d)


def test_cifar_resnet18_matches_robustbench_layout():
    model = timm.create_model("edl_resnet18", mode="none")
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # RobustBench's ResNet-18, 10 classes
    assert [i["reduction"] for i in model.feature_info] == [1, 1, 2, 4, 8]


@pytest.mark.parametrize("mode", ["none", "elastic"])
def test_conv_init_draws_every_convolution_as_timm_or_as_pytorch_does(mode):
    def spread(model):  # (std, largest |w|, fan_in, fan_out) of every convolution's weight
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) == 20  # stem, 16 3x3, 3 downsample 1x1
        return [(m.weight.std().item(), m.weight.abs().max().item(), m.weight[0].numel(),
                 m.weight.shape[0] * m.weight[0, 0].numel()) for m in convs]

    torch.manual_seed(0)
    timm_init = spread(timm.create_model("edl_resnet18", mode=mode))
    torch.manual_seed(0)
    torch_init = spread(timm.create_model("edl_resnet18", mode=mode, conv_init="torch"))
    for std, _, _, fan_out in timm_init:  # Kaiming normal, fan-out, ReLU gain
        assert std == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)
    for std, top, fan_in, _ in torch_init:  # PyTorch's Conv2d: uniform on +-1/sqrt(fan_in)
        bound = fan_in ** -0.5
        assert top <= bound and std == pytest.approx(bound / 3 ** 0.5, rel=0.1)
    with pytest.raises(ValueError, match="conv_init must be 'timm' or 'torch', not 'xavier'"):
        timm.create_model("edl_resnet18", conv_init="xavier")


def test_wide_resnet_layout():
    model = timm.create_model("edl_wide_resnet28_10", mode="none")
    assert sum(p.numel() for p in model.parameters()) == 36_479_194  # RobustBench's WRN-28-10
    with pytest.raises(ValueError, match="depth must be 6n \\+ 4"):
        timm.create_model("edl_wide_resnet28_10", depth=27)


def preact_reference(sd, x, layers, shortcut_from_input):
    """The pre-activation ResNet written out from its definition (the fast-AT reference's
    preact_resnet.py, RobustBench's WideResNet) with F.conv2d and F.batch_norm on a state dict: each
    block BN-ReLU-conv3x3 (the stage's stride on its first block after the first stage)-BN-ReLU-conv3x3
    plus the identity or a 1x1 conv of the block's input or of its pre-activation; then BN-ReLU, the
    average pool and the classifier."""
    def bn(t, name):
        return F.batch_norm(t, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                            sd[f"{name}.bias"], False, 0.0, 1e-5)

    out = F.conv2d(x, sd["conv1.weight"], padding=1)
    for i, n in enumerate(layers):
        for j in range(n):
            name, stride = f"stages.{i}.{j}", 2 if i > 0 and j == 0 else 1
            pre = F.relu(bn(out, f"{name}.bn1"))
            h = F.conv2d(pre, sd[f"{name}.conv1.weight"], stride=stride, padding=1)
            h = F.conv2d(F.relu(bn(h, f"{name}.bn2")), sd[f"{name}.conv2.weight"], padding=1)
            if f"{name}.shortcut.weight" in sd:
                out = h + F.conv2d(out if shortcut_from_input else pre, sd[f"{name}.shortcut.weight"], stride=stride)
            else:
                out = h + out
    return F.linear(F.relu(bn(out, "norm")).mean((2, 3)), sd["fc.weight"], sd["fc.bias"])


def randomise_norms(model, seed=0):
    """BN affine parameters and running statistics away from their initial 1 / 0, so that an
    eval-mode forward depends on every one of them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return model


@pytest.mark.parametrize("name, kwargs, layers, from_input", [
    ("edl_preact_resnet18", dict(channels=(16, 32, 64, 128)), (2, 2, 2, 2), True),
    ("edl_wide_resnet28_10", dict(depth=10, widen_factor=2), (1, 1, 1), False),
])
def test_preact_networks_compute_their_definition(name, kwargs, layers, from_input):
    """The PreAct ResNet-18 reads its 1x1 shortcuts from the block's input, as the fast-AT reference
    does; the WideResNet from the pre-activation, as RobustBench's does: each eval-mode forward equals
    the network written out from its definition (preact_reference), which the other choice misses."""
    torch.manual_seed(0)
    model = randomise_norms(timm.create_model(name, mode="none", **kwargs)).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    sd = model.state_dict()
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, preact_reference(sd, x, layers, from_input), rtol=1e-4, atol=1e-4)
        assert (out - preact_reference(sd, x, layers, not from_input)).abs().max() > 1e-2


def test_preact_resnet18_layout_and_its_bad_arguments():
    model = timm.create_model("edl_preact_resnet18", mode="none")
    # by hand: stem 1,728; stages 147,968 + 525,184 + 2,098,944 + 8,392,192 (1x1 shortcuts included);
    # the final BN 1,024; the classifier 5,130: the fast-AT reference's PreActResNet18 for 10 classes
    assert sum(p.numel() for p in model.parameters()) == 11_172_170
    assert [(i["num_chs"], i["reduction"]) for i in model.feature_info] == [(64, 1), (64, 1), (128, 2), (256, 4), (512, 8)]
    edl = timm.create_model("edl_preact_resnet18")
    assert sum(is_edl_layer(m) for m in edl.modules()) == 17  # the stem and 16 3x3 convolutions
    torch.manual_seed(0)
    drawn = timm.create_model("edl_preact_resnet18", mode="none", conv_init="torch")
    for m in drawn.modules():  # PyTorch's Conv2d draw: uniform on +-1/sqrt(fan_in)
        if isinstance(m, nn.Conv2d):
            assert m.weight.abs().max() <= m.weight[0].numel() ** -0.5
    for bad, message in [(dict(layers=(2, 2)), r"one positive number per stage each; got layers=\(2, 2\), channels=\(64"),
                         (dict(shortcut_from="output"), "shortcut_from must be 'preact' or 'input', not 'output'"),
                         (dict(conv_init="xavier"), "conv_init must be 'timm' or 'torch', not 'xavier'")]:
        with pytest.raises(ValueError, match=message):
            timm.create_model("edl_preact_resnet18", **bad)


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="valid modes are elastic, vanilla, robust, none"):
        timm.create_model("edl_resnet18", mode="sparse")


def test_vit_edl_layers_are_patch_embedding_and_mlp_fc1():
    model = create("edl_vit_tiny_patch4_32")
    edl = sorted(n for n, m in model.named_modules() if is_edl_layer(m))
    assert edl == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1", "blocks.2.mlp.fc1", "patch_embed.proj"]
    assert isinstance(model.patch_embed.proj, EDLConv2d) and isinstance(model.blocks[0].mlp.fc1, EDLLinear)


def test_layer_selection_arguments_choose_the_edl_layers_and_reload(tmp_path):
    from timm.models._hub import save_for_hf

    stem = timm.create_model("edl_resnet18", edl_include="conv1", num_iters=1)
    assert sorted(n for n, m in stem.named_modules() if is_edl_layer(m)) == ["conv1"]
    assert stem.conv1.num_iters == 1 and type(stem.layer1[0].conv1) is nn.Conv2d
    no_stem = timm.create_model("edl_resnet18", edl_exclude=["conv1", "layer4.*"])
    edl = sorted(n for n, m in no_stem.named_modules() if is_edl_layer(m))
    assert len(edl) == 12 and "conv1" not in edl and not any(n.startswith("layer4") for n in edl)
    # the selection is part of the recorded arguments, so a saved model rebuilds with the same layers
    save_for_hf(stem, tmp_path, model_args=stem.edl_cfg, safe_serialization=True)
    again = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    assert sorted(n for n, m in again.named_modules() if is_edl_layer(m)) == ["conv1"]
    x = sample_input(stem)
    assert torch.equal(again.eval()(x), stem.eval()(x))
    with pytest.raises(ValueError, match="matched no nn.Conv2d"):
        timm.create_model("edl_resnet18", edl_include="stem")
