import pytest
import torch

from vim_core.config.transformer import RejectionConfig, SamplingConfig, TransformerModelConfig
from vim_core.errors import VimError
from vim_core.transformer import (
    VIM,
    sample,
    sample_logits,
    select_by_score,
    top_k_filter,
    top_p_filter,
)

V = 32


def model(num_classes: int = 4) -> VIM:
    torch.manual_seed(0)
    cfg = TransformerModelConfig(layers=2, heads=2, dim=32, mlp_dim=64, dropout=0.1, num_classes=num_classes)
    m = VIM(cfg, V, (4, 4))
    # Sharpen the head so samples depend on the context rather than being near-uniform noise.
    with torch.no_grad():
        m.head.weight.mul_(20)
    return m


CASES = [
    {"num_classes": 4, "labels": [0, 1, 2, 3, 1], "cfg_scale": 3.0},
    {"num_classes": 4, "labels": 2},
    {"num_classes": 0, "labels": None},
    {"num_classes": 4, "labels": [3, 0, 1, 2, 0], "cfg_scale": 1.5, "top_k": 5},
    {"num_classes": 0, "labels": None, "top_p": 0.8, "temperature": 0.7},
    {"num_classes": 4, "labels": [1, 2, 3, 0, 1], "top_k": 8, "top_p": 0.9, "batch_size": 2},
]


@pytest.mark.parametrize("case", CASES)
def test_cache_and_full_recompute_give_identical_tokens(case):
    case = dict(case)
    m = model(case.pop("num_classes"))
    labels = case.pop("labels")
    cached = sample(m, 5, labels, seed=7, use_cache=True, **case)
    full = sample(m, 5, labels, seed=7, use_cache=False, **case)
    assert cached.shape == (5, 16) and cached.dtype == torch.long
    assert torch.equal(cached, full)
    assert cached.min() >= 0 and cached.max() < V
    # Different seed, different draw (16 tokens x 5 samples from 32 codes).
    assert not torch.equal(cached, sample(m, 5, labels, seed=8, **case))


def test_seed_reproducible_and_training_mode_restored():
    m = model().train()
    a = sample(m, 3, [0, 1, 2], seed=1)
    b = sample(m, 3, [0, 1, 2], seed=1)
    assert torch.equal(a, b)  # dropout is off while sampling
    assert m.training


def test_cfg_scale_zero_is_the_null_class_model():
    m = model()
    guided = sample(m, 4, [0, 1, 2, 3], cfg_scale=0.0, seed=3)
    null = sample(m, 4, None, seed=3)
    assert torch.equal(guided, null)
    # And the class actually matters: plain conditional samples differ.
    assert not torch.equal(sample(m, 4, [0, 1, 2, 3], seed=3), null)


def test_greedy_matches_argmax_of_forward():
    m = model().eval()
    tokens = sample(m, 2, [1, 3], temperature=0.0)
    logits, _ = m(tokens[:, :-1], torch.tensor([1, 3]))
    assert torch.equal(logits.argmax(-1), tokens)


def test_sample_logits_follows_softmax():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(40000, 1)
    draws = sample_logits(logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.01, rtol=0)
    hot = sample_logits(logits[:2000], temperature=0.25, generator=torch.Generator().manual_seed(0))
    assert (hot == 0).float().mean() > 0.85  # low temperature sharpens towards the mode


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.25, 0.25]]))
    k2 = top_k_filter(logits, 2)
    assert torch.isfinite(k2[0]).tolist() == [False, True, False, True]
    assert torch.isfinite(k2[1]).all()  # ties at the k-th value are all kept
    assert torch.isfinite(top_k_filter(logits, 10)).all()
    p = top_p_filter(logits, 0.65)  # 0.4 + 0.3 reaches 0.65; 0.2 and 0.1 go
    assert torch.isfinite(p[0]).tolist() == [False, True, False, True]
    assert torch.isfinite(top_p_filter(logits, 0.01)[0]).tolist() == [False, True, False, False]
    assert torch.isfinite(top_p_filter(logits, 1.0)).all()


def test_sampling_errors_are_one_line_vim_errors():
    with pytest.raises(VimError, match="unconditional"):
        sample(model(0), 2, [0, 1])
    with pytest.raises(VimError, match="cfg_scale"):
        sample(model(0), 2, cfg_scale=2.0)
    with pytest.raises(VimError, match=r"\[0, 4\)"):
        sample(model(4), 2, [0, 4])
    with pytest.raises(VimError, match="2 samples"):
        sample(model(4), 2, [0, 1, 2])


def test_sampling_config_defaults_are_the_paper_recipe():
    cfg = SamplingConfig()
    assert (cfg.temperature, cfg.top_k, cfg.top_p, cfg.cfg_scale) == (1.0, None, None, 1.0)


def test_acceptance_rate_keeps_exactly_the_top_fraction_per_class():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.7, 0.2, 0.8, 0.3, 0.6])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    keep = select_by_score(scores, labels, RejectionConfig(mode="acceptance_rate", acceptance_rate=0.5))
    assert keep.tolist() == [True, False, False, True, False, True, False, True]
    keep = select_by_score(scores, None, RejectionConfig(acceptance_rate=0.25))
    assert keep.tolist() == [True, False, False, False, False, True, False, False]


def test_threshold_keeps_scores_at_or_above_it():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.49])
    keep = select_by_score(scores, torch.zeros(4, dtype=torch.long), RejectionConfig(mode="threshold"))
    assert keep.tolist() == [True, False, True, False]
