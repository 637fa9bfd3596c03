"""FactorizedQuantizer and the codebook metrics, on small hand-made tensors."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vim_core.tokenizer.metrics import codebook_perplexity, codebook_usage, l1_error, l2_error, psnr
from vim_core.tokenizer.quantizer import FactorizedQuantizer


def test_shapes_and_stats():
    torch.manual_seed(0)
    vq = FactorizedQuantizer(dim=64, codebook_size=16, code_dim=8)
    z = torch.randn(2, 10, 64)
    q, idx, loss, stats = vq(z)
    assert q.shape == (2, 10, 64)
    assert idx.shape == (2, 10) and idx.dtype == torch.long
    assert idx.min() >= 0 and idx.max() < 16
    assert loss.ndim == 0 and loss > 0
    assert 0 < stats["usage"] <= 1 and 1 <= stats["perplexity"] <= 16
    assert vq.codebook.shape == (16, 8)
    # Decoding from ids must give exactly what the forward pass handed the decoder.
    torch.testing.assert_close(vq.lookup(idx), q)


def test_straight_through_gradient_equals_grad_of_quantized():
    torch.manual_seed(0)
    vq = FactorizedQuantizer(dim=4, codebook_size=8, code_dim=None, l2_normalize=False)
    z = torch.randn(3, 5, 4, requires_grad=True)
    q, _, _, _ = vq(z)
    upstream = torch.randn_like(q)
    (q * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream)


def test_gradient_reaches_encoder_through_factorized_l2_path():
    torch.manual_seed(0)
    vq = FactorizedQuantizer(dim=16, codebook_size=8, code_dim=4, l2_normalize=True)
    z = torch.randn(2, 6, 16, requires_grad=True)
    q, _, loss, _ = vq(z)
    (q.pow(2).sum() + loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert vq.proj_in.weight.grad.abs().sum() > 0
    assert vq.codebook.grad.abs().sum() > 0  # the codebook term of the VQ loss moves the codes


def test_l2_normalized_codes_have_unit_norm():
    torch.manual_seed(0)
    vq = FactorizedQuantizer(dim=16, codebook_size=32, code_dim=8, l2_normalize=True)
    vq.codebook.data.mul_(5.0)
    torch.testing.assert_close(vq.codes().norm(dim=-1), torch.ones(32))
    x = vq._project(torch.randn(10, 16))
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(10))


def test_vq_loss_on_hand_made_case():
    vq = FactorizedQuantizer(dim=2, codebook_size=2, code_dim=None, l2_normalize=False, beta=0.25)
    vq.codebook.data = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    z = torch.tensor([[0.2, 0.1], [0.9, 1.2]])
    q, idx, loss, stats = vq(z)
    assert idx.tolist() == [0, 1]
    torch.testing.assert_close(q, torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    # squared errors 0.04, 0.01, 0.01, 0.04 -> mean 0.025; codebook term + 0.25 * commitment term
    torch.testing.assert_close(loss, torch.tensor(0.025 * 1.25))
    assert stats["usage"] == 1.0
    torch.testing.assert_close(stats["perplexity"], torch.tensor(2.0))


def test_no_factorization_path_uses_full_dim():
    vq = FactorizedQuantizer(dim=12, codebook_size=4, code_dim=None, l2_normalize=False)
    assert isinstance(vq.proj_in, torch.nn.Identity) and isinstance(vq.proj_out, torch.nn.Identity)
    assert vq.codebook.shape == (4, 12)
    q, idx, _, _ = vq(torch.randn(7, 12))
    torch.testing.assert_close(q, vq.codebook.data[idx])


def _collapsed_quantizer(threshold: float) -> FactorizedQuantizer:
    """Every input lands on code 0; the other codes sit far away and are never used."""
    vq = FactorizedQuantizer(
        dim=4,
        codebook_size=8,
        code_dim=None,
        l2_normalize=False,
        dead_code_threshold=threshold,
        usage_decay=0.5,
    )
    vq.codebook.data = torch.full((8, 4), 100.0)
    vq.codebook.data[0] = 0.0
    return vq


def test_dead_code_restart_replaces_unused_codes():
    torch.manual_seed(0)
    vq = _collapsed_quantizer(threshold=0.5)
    restarted = 0.0
    for _ in range(6):
        z = torch.randn(32, 4) * 0.1
        _, _, _, stats = vq(z)
        restarted += float(stats["restarted"])
    assert restarted >= 7
    assert (vq.codebook.data.norm(dim=-1) < 10).all(), "dead codes should now sit among the encoder outputs"
    # Restarted codes are taken from the inputs, so they win lookups and the batch usage rises.
    _, _, _, stats = vq(torch.randn(256, 4) * 0.1)
    assert stats["usage"] > 0.5


def test_no_restart_when_off_or_in_eval():
    torch.manual_seed(0)
    for vq, train in (
        (_collapsed_quantizer(threshold=0.0), True),
        (_collapsed_quantizer(threshold=0.5), False),
    ):
        vq.train(train)
        before = vq.codebook.data.clone()
        for _ in range(6):
            vq(torch.randn(32, 4) * 0.1)
        torch.testing.assert_close(vq.codebook.data, before)


def test_data_init_fills_codebook_from_first_batch():
    torch.manual_seed(0)
    vq = FactorizedQuantizer(dim=3, codebook_size=5, code_dim=None, l2_normalize=False, init="data")
    z = torch.randn(40, 3)
    vq(z)
    assert bool(vq.initialized)
    dists = torch.cdist(vq.codebook.data, z)
    assert (dists.min(dim=1).values < 1e-6).all(), "every code should be one of the batch's vectors"
    frozen = vq.codebook.data.clone()
    vq(torch.randn(40, 3) + 10)
    torch.testing.assert_close(vq.codebook.data, frozen)  # only the first batch initialises


def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(1234 + rank)  # different data and sampling on every rank
    vq = FactorizedQuantizer(
        dim=4,
        codebook_size=16,
        code_dim=None,
        l2_normalize=False,
        init="data",
        dead_code_threshold=0.5,
        usage_decay=0.5,
    )
    dist.broadcast(vq.codebook.data, src=0)  # what DDP does at wrap time
    for _ in range(8):
        vq(torch.randn(8, 4) * (rank + 1))
    torch.save({"codebook": vq.codebook.data, "ema": vq.usage_ema}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_codebook_stays_identical_across_ranks(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "state")), nprocs=2)
    a, b = (torch.load(tmp_path / f"state.{r}") for r in range(2))
    torch.testing.assert_close(a["codebook"], b["codebook"])
    torch.testing.assert_close(a["ema"], b["ema"])


def test_usage_metric_on_hand_made_indices():
    k = 10
    full1 = torch.zeros(256, 2, dtype=torch.long)
    full1[:, 1] = 1
    full1[0, 0] = 2  # batch 1 uses {0, 1, 2}: 0.3
    full2 = torch.arange(5).repeat(256 * 2 // 5 + 1)[: 256 * 2].view(256, 2)  # batch 2 uses {0..4}: 0.5
    partial = torch.arange(10).repeat(20)[:176].view(88, 2)  # all 10 codes, but a partial batch: ignored
    idx = torch.cat([full1, full2, partial])
    assert codebook_usage(idx, k, batch_size=256) == pytest.approx(0.4)
    # Fewer images than one batch: the partial batch is all there is.
    assert codebook_usage(torch.arange(7).repeat(100, 1), k) == pytest.approx(0.7)
    assert codebook_usage(idx.numpy(), k) == pytest.approx(0.4)


def test_perplexity_uniform_is_k_and_single_code_is_one():
    assert codebook_perplexity(torch.arange(64).repeat(3), 64) == pytest.approx(64.0, rel=1e-5)
    assert codebook_perplexity(torch.zeros(100, dtype=torch.long), 64) == pytest.approx(1.0)
    # Two codes used 3:1 -> exp(H) with H = -(.75 ln .75 + .25 ln .25)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert codebook_perplexity(torch.tensor([0, 0, 0, 1]), 8) == pytest.approx(math.exp(h), rel=1e-5)


def test_psnr_and_errors():
    x = torch.rand(4, 1, 8, 8) * 0.8
    y = x + 0.1
    assert float(psnr(x, y)) == pytest.approx(20.0, abs=1e-3)
    assert float(l1_error(x, y)) == pytest.approx(0.1, abs=1e-5)
    assert float(l2_error(x, y)) == pytest.approx(0.01, abs=1e-5)
    assert float(psnr(x, x)) == pytest.approx(100.0)


def test_data_init_spreads_codes_over_a_batch_of_duplicates():
    """A batch that is mostly one repeated vector (blank background patches) still seeds distinct codes."""
    torch.manual_seed(0)
    distinct = torch.randn(8, 4) * 3
    z = torch.cat([torch.zeros(200, 4), distinct])
    vq = FactorizedQuantizer(dim=4, codebook_size=9, code_dim=None, l2_normalize=False, init="data")
    vq(z)
    rows = {tuple(r) for r in vq.codebook.data.round(decimals=4).tolist()}
    assert len(rows) == 9, "all 9 codes should be different inputs (8 distinct ones plus the background)"


def test_restarts_go_where_the_codebook_serves_the_data_worst():
    torch.manual_seed(0)
    vq = _collapsed_quantizer(threshold=0.5)  # code 0 at the origin, the other 7 far away and dead
    served = torch.randn(500, 4) * 0.01  # near code 0: already well served
    far = torch.randn(7, 4) + 5.0  # no code near these
    for _ in range(12):  # the hit EMA (decay 0.5) must first fall under the threshold
        vq(torch.cat([served, far]))
    restarted = vq.codebook.data[1:]
    near_far = torch.cdist(restarted, far).min(dim=1).values < 1e-4
    assert near_far.sum() >= 6, "restarted codes should land on the badly served inputs, not the blank ones"
