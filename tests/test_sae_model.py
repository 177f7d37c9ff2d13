"""SAE family: k-sparse step == dense maths, variants, penalties, export round trip, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import traitsae
from traitsae.errors import TraitsaeError
from traitsae.sae.model import VARIANTS, build_sae
from traitsae.sae.sparse_ops import batch_topk_entries, topk_indices
from traitsae.sae.sparsity import L0Penalty, L1Penalty, NoPenalty, TanhPenalty

META = {"backbone": "tiny", "dataset": "synthetic", "layer": 3, "tokens": "patches", "scale": 0.5}


# The family hyperparameters conf/sae/ gives (build_sae has no defaults for them).
FAMILY = {"threshold_momentum": 0.01, "threshold_init": 0.05, "bandwidth": 0.05}


def build(variant: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_sae(variant, 16, 64, k=4, prefixes=[8, 32], **{**FAMILY, **kw})


# Every case runs the grouped path (columns divisible by the group, >= 4 x group x k columns).
@pytest.mark.parametrize(("n_cols", "k"), [(12288, 32), (256, 8), (96, 3)])
def test_grouped_topk_matches_torch_topk(n_cols: int, k: int) -> None:
    pre_BS = torch.randn(64, n_cols)
    ours = topk_indices(pre_BS, k).sort(1).values
    assert torch.equal(ours, pre_BS.topk(k, dim=1).indices.sort(1).values)
    ties_BS = torch.randint(0, 4, (64, n_cols)).float()  # ties: the kept values must agree
    kept = ties_BS.gather(1, topk_indices(ties_BS, k)).sort(1).values
    assert torch.equal(kept, ties_BS.topk(k, dim=1).values.sort(1).values)


def test_sparse_topk_step_has_dense_gradients() -> None:
    sae = build("topk").double().train()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
    x_BD = torch.randn(32, 16, dtype=torch.double)
    loss = sae.reconstruction_loss(x_BD, sae(x_BD))
    loss.backward()
    sparse = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    # the same maths written densely
    pre_BS = (x_BD - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    idx_BK = pre_BS.topk(4, dim=1).indices
    codes_BS = torch.zeros_like(pre_BS).scatter(1, idx_BK, pre_BS.gather(1, idx_BK).relu())
    dense_loss = (codes_BS @ sae.W_dec + sae.b_dec - x_BD).pow(2).mean()
    dense_loss.backward()
    assert loss.item() == pytest.approx(dense_loss.item(), rel=1e-12)
    sae.remove_parallel_grad()  # the sparse decode returns the projected decoder gradient
    for name, param in sae.named_parameters():
        torch.testing.assert_close(sparse[name], param.grad, rtol=1e-9, atol=1e-12)


def test_batch_topk_entries_is_the_exact_batch_top_k() -> None:
    torch.manual_seed(1)
    for pre_BS, n_keep in (
        (torch.randn(256, 512), 256 * 8),  # the sampled threshold path
        (torch.randn(64, 256) - 3.0, 64 * 40),  # fewer positive entries than n_keep
        (torch.randint(-2, 3, (64, 128)).float(), 64 * 4),  # ties at the cut
    ):
        rows_N, idx_N = batch_topk_entries(pre_BS, n_keep)
        flat_N = rows_N * pre_BS.shape[1] + idx_N
        assert (flat_N[1:] > flat_N[:-1]).all()  # row-major, no repeats
        kept = pre_BS[rows_N, idx_N]
        assert (kept > 0).all() and len(kept) <= n_keep
        best = pre_BS.reshape(-1).topk(n_keep).values
        best = best[best > 0]
        assert torch.equal(kept.sort().values, best.sort().values)


def _dense_batchtopk_loss(sae, x_BD: torch.Tensor, k: int, prefixes: list[int] | None):
    """The BatchTopK / Matryoshka objective written densely (the reference maths)."""
    pre_BS = (x_BD - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    acts_BS = pre_BS.relu()
    cut = acts_BS.detach().reshape(-1).topk(k * x_BD.shape[0]).values.min()
    codes_BS = acts_BS * (acts_BS.detach() >= cut) * (acts_BS.detach() > 0)
    if not prefixes:
        return (codes_BS @ sae.W_dec + sae.b_dec - x_BD).pow(2).mean()
    losses = [(codes_BS[:, :p] @ sae.W_dec[:p] + sae.b_dec - x_BD).pow(2).mean() for p in prefixes]
    return torch.stack(losses).mean()


@pytest.mark.parametrize("variant", ["batchtopk", "matryoshka"])
def test_sparse_batchtopk_and_matryoshka_steps_have_dense_gradients(variant: str) -> None:
    sae = build(variant).double().train()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
    x_BD = torch.randn(32, 16, dtype=torch.double)
    out = sae(x_BD)
    assert out.sparse and out.l0().sum().item() == 4 * 32  # exactly k x B entries kept
    loss = sae.reconstruction_loss(x_BD, out)
    loss.backward()
    sparse = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    dense_loss = _dense_batchtopk_loss(sae, x_BD, 4, sae.prefixes)
    dense_loss.backward()
    assert loss.item() == pytest.approx(dense_loss.item(), rel=1e-12)
    sae.remove_parallel_grad()  # the sparse decode returns the projected decoder gradient
    for name, param in sae.named_parameters():
        torch.testing.assert_close(sparse[name], param.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_and_encodes_nonnegative(variant: str) -> None:
    sae = build(variant).train()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x_BD = torch.randn(128, 16)
    losses = []
    for _ in range(15):
        out = sae(x_BD)
        loss = sae.reconstruction_loss(x_BD, out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sae.normalize_decoder()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    codes_BS = sae.eval().encode(x_BD)
    assert codes_BS.shape == (128, 64) and (codes_BS >= 0).all()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)


def test_topk_keeps_k_and_batchtopk_learns_batch_independent_threshold() -> None:
    x_BD = torch.randn(128, 16)
    assert ((build("topk").encode(x_BD) > 0).sum(1) <= 4).all()
    sae = build("batchtopk").train()
    for _ in range(20):
        sae(x_BD)
    threshold = sae.activation.threshold.item()
    assert threshold > 0
    sae.eval()
    alone = torch.cat([sae.encode(x_BD[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(alone, sae.encode(x_BD)[:4])  # no dependence on the batch
    assert (sae.encode(x_BD) > 0).sum(1).float().mean() == pytest.approx(4, rel=0.5)


@pytest.mark.parametrize("training", [True, False])  # sparse step and dense validation
def test_matryoshka_prefixes_each_reconstruct(training: bool) -> None:
    sae = build("matryoshka").train()
    x_BD = torch.randn(64, 16)
    sae(x_BD)  # a threshold for inference
    out = sae.train(training)(x_BD)
    assert len(out.prefix_recons) == 3  # [8, 32] + the whole dictionary (64)
    codes_BS = out.dense_codes().detach()
    torch.testing.assert_close(out.prefix_recons[-1], sae.decode(codes_BS))
    for size, recon_BD in zip([8, 32], out.prefix_recons, strict=False):
        head = codes_BS.clone()
        head[:, size:] = 0
        torch.testing.assert_close(recon_BD, sae.decode(head))
    sampled = build_sae("matryoshka", 16, 64, k=4, sampled_prefixes=3, **FAMILY).train()
    sizes = sampled.prefix_sizes()
    assert len(sizes) == 3 and sizes[-1] == 64 and sizes == sorted(sizes)


def test_auxk_only_uses_dead_latents() -> None:
    sae = build("topk").train()
    x_BD = torch.randn(32, 16)
    out = sae(x_BD)
    none_dead = torch.zeros(64, dtype=torch.bool)
    assert sae.auxk_loss(x_BD, out, none_dead, 8).item() == 0.0
    dead = torch.zeros(64, dtype=torch.bool)
    dead[40:] = True
    aux = sae.auxk_loss(x_BD, out, dead, 8)
    aux.backward()
    assert aux.item() > 0
    assert sae.W_dec.grad[:40].abs().sum() == 0 and sae.W_dec.grad[40:].abs().sum() > 0


def test_penalties_warm_up_and_reach_their_targets() -> None:
    sae = build("jumprelu").train()
    out = sae(torch.randn(32, 16))
    l1 = L1Penalty(coeff=2.0, warmup_steps=10, weight_by_decoder_norm=True)
    assert l1.weight(0) == pytest.approx(0.2) and l1.weight(50) == 2.0
    assert l1(out, sae, 100).item() == pytest.approx(
        2.0 * out.codes_BS.sum(1).mean().item(), rel=1e-5
    )
    assert 0 < TanhPenalty(1.0, 0, scale=1.0)(out, sae, 0).item() < l1(out, sae, 100).item()
    assert NoPenalty()(out, sae, 0).item() == 0.0
    l0 = L0Penalty(coeff=1.0, warmup_steps=0)(out, sae, 0)
    assert l0.item() == pytest.approx((out.codes_BS > 0).sum(1).float().mean().item())
    l0.backward()
    assert sae.activation.log_threshold.grad.abs().sum() > 0  # STE reaches the thresholds
    with pytest.raises(TraitsaeError, match="jumprelu"):
        L0Penalty(1.0, 0)(build("relu").train()(torch.randn(4, 16)), build("relu"), 0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_round_trip_on_raw_activations(tmp_path: Path, variant: str) -> None:
    sae = build(variant).train()
    sae(torch.randn(64, 16))  # BatchTopK: learn a threshold
    sae.eval()
    path = traitsae.sae.save_sae(sae, tmp_path, {**META, "config": {"seed": 0}})
    loaded = traitsae.load_sae(tmp_path)
    record = json.loads(path.read_text())
    assert record["variant"] == variant and record["d_sae"] == 64 and record["scale"] == 0.5
    assert loaded.meta["layer"] == 3 and loaded.d_sae == 64 and not loaded.training
    x_raw = torch.randn(8, 16).half() * 2  # raw space, float16 as in the store
    torch.testing.assert_close(loaded.encode(x_raw), sae.encode(x_raw.float() * 0.5))
    codes = loaded.encode(x_raw)
    torch.testing.assert_close(loaded.decode(codes), sae.decode(codes) / 0.5)
    assert traitsae.load_sae(path).d_sae == 64  # the json path works too
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))


def test_bad_input_errors(tmp_path: Path) -> None:
    with pytest.raises(TraitsaeError, match=r"sae.k=99 .*d_sae=64"):
        build_sae("topk", 16, 64, k=99)
    with pytest.raises(TraitsaeError, match="strictly increasing"):
        build_sae("matryoshka", 16, 64, k=4, prefixes=[32, 8], **FAMILY)
    with pytest.raises(TraitsaeError, match="no larger than d_sae=64"):
        build_sae("matryoshka", 16, 64, k=4, prefixes=[8, 128], **FAMILY)
    with pytest.raises(TraitsaeError, match="relu, topk, batchtopk, jumprelu, matryoshka"):
        build_sae("gated", 16, 64)
    with pytest.raises(TraitsaeError, match="no exported SAE"):
        traitsae.load_sae(tmp_path)
    with pytest.raises(TraitsaeError, match="missing"):
        traitsae.sae.save_sae(build("topk"), tmp_path, {"backbone": "tiny"})
    traitsae.sae.save_sae(build("topk"), tmp_path, META)
    with pytest.raises(TraitsaeError, match=r"shape \[B, 16\]"):
        traitsae.load_sae(tmp_path).encode(torch.randn(2, 768))
