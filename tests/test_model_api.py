"""timm API contracts for the ldn_* models, to the standard timm's test_models.py sets for spatial backbones."""
import copy
import fnmatch

import pytest
import torch

import timm
import timm_ldn  # noqa: F401  registers the models
from timm.models import get_notrace_functions, get_notrace_modules

VARIANTS = ['ldn_tiny', 'ldn_small', 'ldn_base']


def _tiny(**kwargs):
    """A shallow ldn_tiny: same code paths as the variants, fast enough for mechanics tests."""
    kwargs.setdefault('depth', 4)
    return timm.create_model('ldn_tiny', **kwargs)


def test_variants_are_registered():
    assert set(VARIANTS) <= set(timm.list_models('ldn*'))
    assert set(VARIANTS) <= set(timm.list_models(module='ldn'))


@pytest.mark.parametrize('name', VARIANTS)
def test_variant_config_on_meta_device(name):
    with torch.device('meta'):
        model = timm.create_model(name)
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (3, 224, 224) and cfg['pool_size'] == (14, 14)
    sd = model.state_dict()
    assert cfg['first_conv'] + '.weight' in sd and cfg['classifier'] + '.weight' in sd
    assert len(model.blocks) == 12
    widths = {'ldn_tiny': 192, 'ldn_small': 384, 'ldn_base': 768}
    assert model.num_features == model.head_hidden_size == widths[name]


def test_accepts_every_train_py_keyword(tmp_path):
    ckpt = tmp_path / 'ckpt.pth'
    ref = _tiny(num_classes=7, in_chans=1)
    torch.save({'state_dict': ref.state_dict()}, ckpt)
    model = _tiny(
        num_classes=7, in_chans=1, drop_rate=0.1, drop_path_rate=0.1, global_pool='avg', drop_block_rate=None,
        bn_momentum=None, bn_eps=None, scriptable=False, checkpoint_path=str(ckpt), img_size=160,
    )
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)
    x = torch.randn(2, 1, 160, 160)
    assert model(x).shape == (2, 7)


def test_unsupported_keywords_fail_clearly():
    with pytest.raises(ValueError, match='drop_path_rate'):
        _tiny(drop_block_rate=0.1)
    with pytest.warns(UserWarning, match='no BatchNorm'):
        _tiny(bn_momentum=0.01)
    with pytest.raises(TypeError):
        _tiny(not_a_model_arg=1)
    with pytest.raises(ValueError, match='divisible by num_heads'):
        _tiny(num_heads=5)
    with pytest.raises(ValueError, match='offsets'):
        _tiny(diffusion_offsets=(0, 2))


@pytest.mark.parametrize('size', [(96, 96), (128, 128), (224, 224), (384, 384), (224, 320), (48, 512)])
def test_forward_any_multiple_of_patch_size(size):
    model = _tiny(num_classes=10).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        feats = model.forward_features(x)
        out = model.forward_head(feats)
    assert feats.shape == (2, 192, size[0] // 16, size[1] // 16)
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_same_weights_run_at_1024():
    model = timm.create_model('ldn_tiny').eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 1024, 1024))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_dynamic_img_pad():
    model = _tiny(dynamic_img_pad=True).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 230, 250))
    assert feats.shape[-2:] == (15, 16)  # ceil(230/16), ceil(250/16)


def test_backward_reaches_every_parameter():
    model = _tiny(num_classes=42, drop_path_rate=0.1).train()
    model(torch.randn(2, 3, 64, 64)).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_head_and_pooling_contract():
    model = _tiny().eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert feats.shape == (2, model.num_features, *model.pretrained_cfg['pool_size'])
        assert pre.shape == (2, model.head_hidden_size)
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pre)
        model.reset_classifier(0, '')
        assert model(x).shape == feats.shape
        model.reset_classifier(5, 'avg')
        assert model(x).shape == (2, 5)
    unpooled = _tiny(num_classes=0, global_pool='').eval()
    with torch.no_grad():
        assert unpooled(x).shape == feats.shape
    assert _tiny(num_classes=0)(x).shape == pre.shape


def test_features_only():
    model = timm.create_model('ldn_tiny', features_only=True).eval()
    assert len(model.feature_info.channels()) >= 3
    assert model.feature_info.reduction() == [16] * len(model.feature_info.channels())
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 128, 96))
    assert len(outs) == len(model.feature_info.channels())
    for o, c in zip(outs, model.feature_info.channels()):
        assert o.shape == (2, c, 8, 6)
    picked = timm.create_model('ldn_tiny', features_only=True, out_indices=(0, 5, 11))
    assert picked.feature_info.module_name() == ['blocks.0', 'blocks.5', 'blocks.11']


def test_forward_intermediates_contract():
    model = _tiny().eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        final, inters = model.forward_intermediates(x)
        assert len(inters) == len(model.blocks)
        torch.testing.assert_close(final, model.forward_features(x))
        assert all(t.shape == (2, 192, 6, 8) for t in inters)
        nhwc = model.forward_intermediates(x, indices=[1, 3], output_fmt='NHWC', intermediates_only=True)
        torch.testing.assert_close(nhwc[0], inters[1].permute(0, 2, 3, 1))
        torch.testing.assert_close(nhwc[1], inters[3].permute(0, 2, 3, 1))
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        torch.testing.assert_close(last_two[1], inters[-1])
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], inters[1])
        normed = model.forward_intermediates(x, indices=[1], norm=True, intermediates_only=True)[0]
        assert not torch.allclose(normed, inters[1])
        torch.testing.assert_close(normed.mean(1), torch.zeros(2, 6, 8), atol=1e-5, rtol=0)  # LN over channels
    with pytest.raises(AssertionError):
        model.forward_intermediates(x, output_fmt='NLC')


@pytest.mark.parametrize('index,prune_norm', [(0, False), (2, True), (3, False)])
def test_prune_intermediate_layers(index, prune_norm):
    model = _tiny(drop_rate=0.5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
    pruned = copy.deepcopy(model)
    take = pruned.prune_intermediate_layers([index], prune_norm=prune_norm)
    assert len(pruned.blocks) == index + 1
    with torch.no_grad():
        got = pruned.forward_intermediates(x, indices=take, intermediates_only=True)
    torch.testing.assert_close(got[0], taps[index])
    pruned.train()
    feats = pruned.forward_intermediates(x, indices=take, norm=not prune_norm, intermediates_only=True)
    sum(f.sum() for f in feats).backward()
    unused = [n for n, p in pruned.named_parameters() if p.grad is None]
    assert not unused, f'unused parameters after pruning (DDP would fail): {unused}'


def test_grad_checkpointing_is_exact():
    torch.manual_seed(0)
    model = _tiny(drop_path_rate=0.).train()
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], msg=n)
    inter_final, _ = model.forward_intermediates(x)
    torch.testing.assert_close(inter_final, model.forward_features(x))


def test_layer_decay_and_no_weight_decay_groups():
    from timm.optim import create_optimizer_v2
    model = timm.create_model('ldn_tiny')
    names = [n for n, _ in model.named_parameters()]
    patterns = model.no_weight_decay()
    for pattern in patterns:
        assert any(fnmatch.fnmatch(n, pattern) for n in names), pattern
    opt = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    group_of = {id(p): g for g in opt.param_groups for p in g['params']}
    params = dict(model.named_parameters())
    scale = lambda n: group_of[id(params[n])]['lr_scale']  # noqa: E731
    assert scale('patch_embed.proj.weight') < scale('blocks.0.attn.qkv.weight') < scale('blocks.11.attn.qkv.weight')
    assert scale('blocks.11.attn.qkv.weight') < scale('head.fc.weight') == 1.0
    for n in ('blocks.3.diffusion.a_raw', 'blocks.3.diffusion.tau', 'blocks.3.ls1.gamma', 'blocks.3.norm1.weight'):
        assert group_of[id(params[n])]['weight_decay'] == 0., n
    assert group_of[id(params['blocks.3.attn.qkv.weight'])]['weight_decay'] == 0.05


def test_torchscript_matches_eager():
    with timm.set_scriptable(True):
        model = _tiny(depth=2).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))
        torch.testing.assert_close(scripted.forward_features(x), model.forward_features(x))


def test_fx_feature_extraction_forward_and_backward():
    from torchvision.models.feature_extraction import create_feature_extractor
    model = _tiny(depth=3).train()
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    extractor = create_feature_extractor(
        model, return_nodes={'blocks.1': 'mid', 'head.fc': 'logits'}, tracer_kwargs=tracer_kwargs)
    x = torch.randn(2, 3, 64, 64)
    out = extractor(x)
    assert out['mid'].shape == (2, 4, 4, 192)  # blocks run channels-last
    torch.manual_seed(0)
    model.eval(), extractor.eval()
    with torch.no_grad():
        torch.testing.assert_close(extractor(x)['logits'], model(x))
    extractor.train()
    extractor(x)['logits'].sum().backward()
    assert all(p.grad is not None for p in extractor.parameters())


def test_torch_compile_fullgraph_without_graph_breaks():
    model = _tiny(depth=2).eval()
    x = torch.randn(2, 3, 64, 64)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_bf16_autocast_and_half_model_stay_finite():
    model = _tiny(depth=2).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x)
    assert torch.isfinite(out).all()
    with torch.no_grad():
        out16 = model.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16).all()


def test_nan_input_stays_inside_its_sample():
    """Documented behaviour: NaN/Inf pixels poison only their own image's output, never the rest of the batch."""
    model = _tiny(depth=2).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        clean = model(x)
        x[1, 0, 5, 7] = float('nan')
        x[2, 1, 0, 0] = float('inf')
        dirty = model(x)
    torch.testing.assert_close(dirty[0], clean[0])
    assert torch.isnan(dirty[1]).all() and not torch.isfinite(dirty[2]).all()


def test_batch_independence():
    model = _tiny(depth=2).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.cat([model(x[i:i + 1]) for i in range(3)]), rtol=1e-5, atol=1e-5)


def test_torch_func_transforms_work():
    """vmap / jacrev (per-sample gradients, Jacobians) go through the same model as plain autograd."""
    model = _tiny(depth=1, embed_dim=24, num_heads=2, num_classes=3).train()
    x = torch.randn(3, 3, 32, 32)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi):
        return torch.func.functional_call(model, p, (xi.unsqueeze(0),)).logsumexp(-1).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(3):
        model.zero_grad()
        loss(dict(model.named_parameters()), x[i]).backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(per_sample[k][i], p.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_weight_init_option():
    """``weight_init='torch'`` keeps PyTorch's Linear init (uniform, bound 1/sqrt(fan_in)); the default is ViT's
    N(0, 0.02) with zero biases; anything else is refused with the choices named."""
    torch.manual_seed(0)
    default = timm.create_model('ldn_tiny', depth=1)
    torch.manual_seed(0)
    native = timm.create_model('ldn_tiny', depth=1, weight_init='torch')
    fc1, fc1_native = default.blocks[0].mlp.fc1, native.blocks[0].mlp.fc1
    bound = fc1.in_features ** -0.5
    assert float(fc1.weight.std()) == pytest.approx(0.02, rel=0.05) and not fc1.bias.any()
    assert float(fc1_native.weight.abs().max()) <= bound
    assert float(fc1_native.weight.std()) == pytest.approx(bound / 3 ** 0.5, rel=0.05)
    assert float(fc1_native.bias.abs().max()) <= bound and fc1_native.bias.any()
    with pytest.raises(ValueError, match="weight_init must be 'trunc_normal'"):
        timm.create_model('ldn_tiny', depth=1, weight_init='jax')
