import pytest
import torch
from pydantic import ValidationError

from vim_core.config.transformer import PRESETS, TransformerModelConfig, resolve_model
from vim_core.transformer import VIM

V = 16
GRID = (3, 5)  # not square, so a row/column mix-up in the 2D position embedding shows


def small(num_classes: int = 5, pos: str = "2d", **kw) -> VIM:
    torch.manual_seed(0)
    cfg = TransformerModelConfig(
        layers=3, heads=2, dim=32, mlp_dim=64, dropout=0.0, num_classes=num_classes, pos_embedding=pos, **kw
    )
    return VIM(cfg, V, GRID).eval()


def test_config_rejects_bad_heads_and_unknown_preset():
    with pytest.raises(ValidationError, match="divisible"):
        TransformerModelConfig(layers=1, heads=3, dim=32, mlp_dim=64)
    with pytest.raises(ValueError, match="unknown VIM preset"):
        resolve_model("vim-huge")


@pytest.mark.parametrize(("name", "paper_params"), [("vim-base", 650e6), ("vim-large", 1.7e9)])
def test_paper_presets_match_reported_size(name, paper_params):
    with torch.device("meta"):  # no memory: only shapes
        model = VIM(name, 8192, 32)
    assert model.num_params() == pytest.approx(paper_params, rel=0.12)
    assert PRESETS[name].dropout == 0.1
    assert resolve_model(name).cfg_dropout == 0.0  # presets are shapes; label dropout is set in train


@pytest.mark.parametrize("num_classes", [0, 5])
@pytest.mark.parametrize("pos", ["2d", "full"])
def test_forward_shapes_and_loss(num_classes, pos):
    model = small(num_classes, pos)
    x = torch.randint(0, V, (4, 15))
    y = torch.randint(0, 5, (4,)) if num_classes else None
    logits, loss = model(x[:, :-1], y, targets=x)
    assert logits.shape == (4, 15, V)
    assert loss.item() == pytest.approx(model.compute_loss(x, y).item())
    # Near-uniform predictions at init.
    assert abs(loss.item() - torch.log(torch.tensor(float(V))).item()) < 0.5
    with pytest.raises(ValueError, match="exceeds"):
        model(x)  # L inputs plus the prefix would need L+1 positions


def test_causal_mask_later_tokens_do_not_change_earlier_logits():
    model = small()
    x = torch.randint(0, V, (2, 14))
    y = torch.tensor([1, 3])
    a, _ = model(x, y)
    x2 = x.clone()
    x2[:, 8:] = (x2[:, 8:] + 1) % V
    b, _ = model(x2, y)
    # Output i sees inputs up to t_{i-1}: positions 0..8 are blind to t_8 onwards.
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_class_token_changes_output():
    model = small()
    x = torch.randint(0, V, (1, 14)).repeat(2, 1)
    logits, _ = model(x, torch.tensor([0, 4]))
    assert not torch.allclose(logits[0], logits[1])
    null, _ = model(x[:1], None)  # no labels -> the null class
    explicit, _ = model(x[:1], torch.tensor([model.null_class]))
    torch.testing.assert_close(null, explicit)


def test_an_unconditional_copy_predicts_what_the_null_class_does():
    source = small()
    with torch.no_grad():  # a trained look: every class embedding its own, not the init's
        source.cls_emb.weight.normal_()
    copy = small(0)
    copy.start_from_conditional(source)
    x = torch.randint(0, V, (3, 14))
    null, _ = source(x, None)
    uncond, _ = copy(x, None)
    torch.testing.assert_close(uncond, null)
    assert not torch.allclose(uncond, source(x, torch.zeros(3, dtype=torch.long))[0])


def test_an_unconditional_copy_needs_a_conditional_source_of_its_shape():
    with pytest.raises(ValueError, match="class-conditional"):
        small(0).start_from_conditional(small(0))
    with pytest.raises(ValueError, match="class-conditional"):
        small(5).start_from_conditional(small(5))
    wider = VIM(TransformerModelConfig(layers=3, heads=2, dim=48, mlp_dim=64, num_classes=5), V, GRID)
    with pytest.raises(RuntimeError, match="size mismatch"):
        small(0).start_from_conditional(wider)


def test_unconditional_model_refuses_labels():
    with pytest.raises(ValueError, match="unconditional"):
        small(0)(torch.zeros(1, 3, dtype=torch.long), torch.tensor([1]))


def test_cfg_dropout_swaps_some_labels_for_null_in_training_only():
    model = small(cfg_dropout=0.5).train()
    x = torch.randint(0, V, (1, 4)).repeat(64, 1)
    y = torch.full((64,), 2)
    with torch.no_grad():
        torch.manual_seed(1)
        train_logits, _ = model(x, y)
        model.eval()
        cond, _ = model(x[:1], y[:1])
        null, _ = model(x[:1], None)
    is_null = torch.isclose(train_logits, null, atol=1e-5).flatten(1).all(1)
    is_cond = torch.isclose(train_logits, cond, atol=1e-5).flatten(1).all(1)
    assert (is_null | is_cond).all()
    assert 10 < is_null.sum() < 54


@pytest.mark.parametrize("chunks", [[1] * 15, [5, 4, 6], [15]])
def test_kv_cache_forward_matches_full_forward(chunks):
    model = small()
    x = torch.randint(0, V, (3, 14))
    y = torch.tensor([0, 1, 2])
    full, _ = model(x, y)
    cache = model.make_cache(3)
    parts, pos = [], 0
    for n in chunks:  # sequence positions [pos, pos+n): the prefix at 0, then tokens
        inp = x[:, max(pos - 1, 0) : pos + n - 1]
        logits, _ = model(inp, y, cache=cache)
        parts.append(logits)
        pos += n
    assert cache.pos == 15
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_features_shape_and_block_selection():
    model = small()
    x = torch.randint(0, V, (4, 15))
    captured = {}
    hooks = [
        b.register_forward_hook(lambda _m, _i, out, k=k: captured.__setitem__(k, out))
        for k, b in enumerate(model.blocks)
    ]
    model(x[:, :-1])
    for h in hooks:
        h.remove()
    for block in (0, 2):
        feats = model.features(x, block=block)
        assert feats.shape == (4, 32)
        h = captured[block]
        expected = torch.nn.functional.layer_norm(h, (32,)).mean(1)
        torch.testing.assert_close(feats, expected)
    assert model.features(x).shape == (4, 32)  # default: the middle block (1 of 3)
    torch.testing.assert_close(model.features(x), model.features(x, block=1))
    assert not torch.allclose(model.features(x, block=0), model.features(x, block=2))
    with pytest.raises(ValueError, match="out of range"):
        model.features(x, block=3)


def test_configure_optimizers_covers_every_parameter_once():
    model = small()
    opt = model.configure_optimizers(weight_decay=0.1, lr=1e-3)
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    assert len(seen) == len(set(seen))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"])
    assert any(p is model.tok_emb.weight for p in no_decay["params"])
    assert opt.defaults["betas"] == (0.9, 0.96)


def test_a_few_steps_reduce_loss_on_synthetic_tokens():
    model = small().train()
    # Each class draws a fixed, class-specific token pattern with a little noise.
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (64,), generator=gen)
    base = (y[:, None] * 3 + torch.arange(15)[None]) % V
    noise = torch.rand(base.shape, generator=gen) < 0.1
    x = torch.where(noise, torch.randint(0, V, base.shape, generator=gen), base)
    opt = model.configure_optimizers(weight_decay=0.0, lr=3e-3)
    first = model.compute_loss(x, y).item()
    for _ in range(40):
        loss = model.compute_loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_spec_round_trip_and_flops():
    model = small()
    clone = VIM.from_spec(model.spec())
    clone.load_state_dict(model.state_dict())
    x = torch.randint(0, V, (2, 14))
    torch.testing.assert_close(clone.eval()(x)[0], model(x)[0])
    assert model.flops_per_token() > 6 * model.num_params(non_embedding=True)
    assert VIM("tiny", 512, 8).flops_per_token() < VIM("tiny", 512, 16).flops_per_token()
