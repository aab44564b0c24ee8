"""Parameter groups by path rules, and a few steps against torch.optim.AdamW with the same groups."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vpd_jax.training import optimizer as O


def _params(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {
        "unet": {"conv_in": {"kernel": (3, 3, 4, 8), "bias": (8,)}, "norm": {"scale": (8,), "bias": (8,)}},
        "vae": {"encoder": {"conv": {"kernel": (3, 3, 3, 4), "bias": (4,)}}},
        "head": {"deconv_0": {"kernel": (2, 2, 8, 8)}, "bn_0": {"scale": (8,), "bias": (8,)}},
        "text_adapter": {"fc1": {"kernel": (16, 16), "bias": (16,)}},
        "gamma": (16,),
    }
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


def _flat_labels(params, rules):
    labels = O.param_labels(params, rules)
    return {O.path_to_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(labels)[0]}


def test_official_groups():
    got = _flat_labels(_params(), O.ParamRules(no_decay="official"))
    assert got == {
        "unet/conv_in/kernel": "lr_x0.01/decay",
        "unet/conv_in/bias": "lr_x0.01/no_decay",
        "unet/norm/scale": "lr_x0.01/no_decay",
        "unet/norm/bias": "lr_x0.01/no_decay",
        "vae/encoder/conv/kernel": "frozen",
        "vae/encoder/conv/bias": "frozen",
        "head/deconv_0/kernel": "lr_x1/decay",
        "head/bn_0/scale": "lr_x1/no_decay",
        "head/bn_0/bias": "lr_x1/no_decay",
        "text_adapter/fc1/kernel": "lr_x1/decay",
        "text_adapter/fc1/bias": "lr_x1/no_decay",
        "gamma": "lr_x1/no_decay",
    }


def test_mmseg_groups_and_custom_regexes():
    rules = O.ParamRules(no_decay="mmseg", lr_multipliers=((r"^(unet|text_adapter)/", 0.01),))
    got = _flat_labels(_params(), rules)
    assert got["unet/norm/scale"] == "lr_x0.01/decay"  # norm weights are decayed in mmseg
    assert got["unet/norm/bias"] == "lr_x0.01/no_decay"
    assert got["gamma"] == "lr_x1/decay"
    assert got["head/bn_0/scale"] == "lr_x1/decay"
    assert got["text_adapter/fc1/kernel"] == "lr_x0.01/decay"
    assert got["vae/encoder/conv/kernel"] == "frozen"
    groups = O.describe_groups(_params(), rules)
    assert sorted(groups["frozen"]) == ["vae/encoder/conv/bias", "vae/encoder/conv/kernel"]


def test_frozen_leaves_get_no_state_and_no_update():
    params = _params()
    tx = O.adamw(1e-2)
    state = tx.init(params)
    n_vae = sum(x.size for x in jax.tree.leaves(params["vae"]))
    n_state = sum(x.size for x in jax.tree.leaves(state) if hasattr(x, "size"))
    n_train = sum(x.size for x in jax.tree.leaves(params)) - n_vae
    assert n_state < 2 * n_train + 100  # mu and nu of the trainable leaves, a few counters, nothing for the VAE
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates["vae"]))
    assert all(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates["head"]))


@pytest.mark.parametrize("no_decay", ["official", "mmseg"])
def test_steps_match_torch_adamw(no_decay):
    torch = pytest.importorskip("torch")
    rules = O.ParamRules(no_decay=no_decay)
    schedule = lambda c: 1e-2 * (1.0 + c) / (2.0 + c)  # noqa: E731 (changes each step)
    tx = O.adamw(schedule, weight_decay=0.1, rules=rules)
    params = _params(1)
    labels = _flat_labels(params, rules)
    flat = {O.path_to_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}

    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in flat.items() if labels[k] != "frozen"}
    groups = []
    for label in sorted({labels[k] for k in tparams}):
        mult = float(label.split("/")[0][len("lr_x") :])
        names = [k for k in tparams if labels[k] == label]
        wd = 0.1 if label.endswith("/decay") else 0.0
        groups.append({"params": [tparams[k] for k in names], "weight_decay": wd, "lr_scale": mult})
    topt = torch.optim.AdamW(groups, lr=1.0, betas=(0.9, 0.999), eps=1e-8)

    state = tx.init(params)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(2)
    for step in range(4):
        gflat = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in flat.items()}
        grads = jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(params),
            [jnp.asarray(gflat[O.path_to_str(p)]) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        )
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        for g in topt.param_groups:
            g["lr"] = schedule(step) * g["lr_scale"]
        for k, t in tparams.items():
            t.grad = torch.tensor(gflat[k])
        topt.step()

    got = {O.path_to_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    for k, t in tparams.items():
        np.testing.assert_allclose(got[k], t.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
    for k in flat:
        if labels[k] == "frozen":
            np.testing.assert_array_equal(got[k], flat[k])


def test_learning_rates_for_logging():
    lrs = O.learning_rates(lambda c: 2.0, 0)
    assert float(lrs["lr"]) == 2.0 and float(lrs["lr_x0.01"]) == pytest.approx(0.02)
    with pytest.raises(ValueError):
        O.ParamRules(no_decay="sometimes")


def test_segmentation_paramwise_rule_matches_mmengines_constructor():
    """VPD segmentation's custom_keys (unet lr x0.1, encoder_vq lr x0, 'norm' decay x0) through mmengine's own
    DefaultOptimWrapperConstructor (mmcv 0.x's rule, keys tried longest first and the first match only), on modules
    named as in the official checkpoint, against our labels of the same parameters."""
    torch = pytest.importorskip("torch")
    mmengine_optim = pytest.importorskip("mmengine.optim")
    nn = torch.nn
    # official CompVis/mmseg module name -> (module, our Flax path of its weight)
    named = {
        "unet.unet.diffusion_model.input_blocks.1.0.in_layers.0": (
            nn.GroupNorm(2, 4), "unet/down_blocks_0/resnets_0/norm1/scale"),
        "unet.unet.diffusion_model.input_blocks.1.0.in_layers.2": (
            nn.Conv2d(4, 4, 3), "unet/down_blocks_0/resnets_0/conv1/kernel"),
        "unet.unet.diffusion_model.input_blocks.1.1.norm": (
            nn.GroupNorm(2, 4), "unet/down_blocks_0/attentions_0/norm/scale"),
        "unet.unet.diffusion_model.input_blocks.1.1.transformer_blocks.0.norm2": (
            nn.LayerNorm(4), "unet/down_blocks_0/attentions_0/transformer_blocks_0/norm2/scale"),
        "unet.unet.diffusion_model.middle_block.1.transformer_blocks.0.norm3": (
            nn.LayerNorm(4), "unet/mid_block/attentions_0/transformer_blocks_0/norm3/scale"),
        "unet.unet.diffusion_model.input_blocks.1.1.proj_in": (
            nn.Conv2d(4, 4, 1), "unet/down_blocks_0/attentions_0/proj_in/kernel"),
        "text_adapter.fc.0": (nn.Linear(4, 4), "text_adapter/fc1/kernel"),
        "decode_head.scale_heads.0.0.bn": (nn.BatchNorm2d(4), "head/decode_head/scale_heads_0_0/bn/scale"),
        "decode_head.conv_seg": (nn.Conv2d(4, 3, 1), "head/decode_head/conv_seg/kernel"),
        "neck.lateral_convs.0.conv": (nn.Conv2d(4, 4, 1), "head/neck/lateral_convs_0/kernel"),
    }
    root = nn.Module()
    for dotted, (module, _) in named.items():
        parent = root
        *path, last = dotted.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(last, module)
    base_lr, base_wd = 8e-5, 1e-3
    ctor = mmengine_optim.DefaultOptimWrapperConstructor(
        dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=base_lr, weight_decay=base_wd)),
        dict(custom_keys={"unet": dict(lr_mult=0.1), "encoder_vq": dict(lr_mult=0.0),
                          "text_encoder": dict(lr_mult=0.0), "norm": dict(decay_mult=0.0)}))
    groups = ctor(root).optimizer.param_groups
    by_param = {id(p): g for g in groups for p in g["params"]}
    rules = O.ParamRules(lr_multipliers=((r"^unet(/|$)", 0.1),), no_decay="mmcv_norm")
    for dotted, (module, ours) in named.items():
        g = by_param[id(module.weight)]
        want = f"lr_x{g['lr'] / base_lr:g}/{'decay' if g['weight_decay'] > 0 else 'no_decay'}"
        got = O._leaf_label(ours, np.zeros((4,)), rules)
        assert got == want, (dotted, ours, got, want)
    # what the rule gives the UNet transformers' norms: the full rate, no decay (their 'unet' x0.1 is never reached)
    assert O._leaf_label("unet/up_blocks_1/attentions_2/transformer_blocks_0/norm1/bias", np.zeros(4), rules) == \
        "lr_x1/no_decay"
