"""The structure losses behind --lambda_structure (MIND) and --lambda_nce (PatchNCE), and the objectives' bookkeeping."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from train.config import load_config
from train.inference import Translator
from train.losses import (MAX_SHIFT, ImagePool, Objective, PatchNCE, dropout_masks_at, generator_losses, laplace_nll, mind, move_at,
                          noise_at)
from train.networks import CycleGenerators, Discriminators, build_discriminator, build_generator, flip_shift


def phantom(shift: int = 0) -> torch.Tensor:
    """Two tissues and a bright disc: T1-like; 1 - x gives the same anatomy with inverted contrast."""
    y, x = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    head = ((x - 32) ** 2 + (y - 32) ** 2 < 26**2).float()
    disc = ((x - 24 - shift) ** 2 + (y - 30) ** 2 < 6**2).float()
    return (0.3 * head + 0.5 * disc)[None, None]


def test_mind_ignores_contrast_but_sees_structure():
    t1 = phantom()
    t2_same_anatomy = 1.0 - 0.8 * t1  # another contrast, same edges
    t2_moved_lesion = 1.0 - 0.8 * phantom(shift=8)
    same = (mind(t1) - mind(t2_same_anatomy)).abs().mean()
    moved = (mind(t1) - mind(t2_moved_lesion)).abs().mean()
    assert same < 1e-4 and moved > 100 * same


def test_mind_loss_has_gradients_toward_the_input_structure():
    target = mind(phantom())
    guess = torch.full((1, 1, 64, 64), 0.5, requires_grad=True)
    optimizer = torch.optim.Adam([guess], lr=0.05)
    first = None
    for _ in range(60):
        loss = (mind(guess + 0.01 * torch.randn_like(guess)) - target).abs().mean()
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


def folded_head(shift: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """T1-like grey/white folding over most of a head (so most pixels are structure, as in anatomy) around a
    flat, dark ventricle; and the head mask."""
    y, x = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
    head = (x - 48) ** 2 + (y - 48) ** 2 < 44**2
    t1 = torch.where(torch.sin((x - shift) / 2.5) * torch.sin(y / 3.0) > 0, 0.85, 0.55) * head
    t1 = torch.where((x - 48 - shift) ** 2 / 14**2 + (y - 48) ** 2 / 8**2 < 1, 0.15, t1)
    return t1[None, None], head[None, None]


def test_the_mind_noise_floor_stops_rewarding_a_translation_that_copies_its_inputs_noise():
    """The true T2 has noise of its own; a translation that passes the T1's noise on (amplified, as a steep
    mapping of dark T1 tissue does) matches the noisy input's MIND better than the truth does, unless the
    floor keeps noise-level distances from describing anything. Moved anatomy still costs far more."""
    to_t2 = lambda t1: torch.where(t1 > 0.7, 0.45, torch.where(t1 > 0.3, 0.7, torch.where(t1 > 0.1, 1.0, 0.0)))
    model_range = lambda image: 2 * image - 1
    t1, head = folded_head()
    generator = torch.Generator().manual_seed(0)
    noise_in, noise_out = (0.02 * torch.randn(t1.shape, generator=generator) for _ in range(2))
    source = model_range(t1) + noise_in * head
    truth = model_range(to_t2(t1)) + noise_out * head
    copy = model_range(to_t2(t1)) - 3 * noise_in * head
    moved = model_range(to_t2(folded_head(shift=2)[0])) + noise_out * head

    def cost(translation, floor):
        return float((mind(translation, noise_floor=floor) - mind(source, noise_floor=floor)).abs().mean())

    assert cost(copy, 0.0) < cost(truth, 0.0)
    assert cost(truth, 3.0) < 0.6 * cost(copy, 3.0)
    assert cost(moved, 3.0) > 5 * cost(truth, 3.0)


def test_the_mind_noise_floor_keeps_a_weak_edge_beside_strong_ones():
    """A T2 whose grey-white edges are weak (5 times the noise) beside strong CSF edges over most of the head,
    as a real T2's are: the floor is set by the noise, not by the strong edges, so a T1 translation that
    erases the folds behind the weak edges still costs twice the truth there (a floor at half the median
    local variance made erasing them twelve times cheaper than the truth)."""
    y, x = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
    head = (x - 48) ** 2 + (y - 48) ** 2 < 44**2
    folds = torch.sin(x / 2.5) * torch.sin(y / 3.0) > 0
    weak = head & (x >= 64)
    t1 = (torch.where(folds, 0.85, 0.55) * head)[None, None]
    t2 = (torch.where(weak, torch.where(folds, 0.55, 0.6), torch.where(folds, 0.3, 0.9)) * head)[None, None]
    generator = torch.Generator().manual_seed(0)
    noise_in, noise_out = (0.01 * torch.randn(t1.shape, generator=generator) * head for _ in range(2))
    source = 2 * t2 - 1 + noise_in
    truth = 2 * t1 - 1 + noise_out
    erased = 2 * torch.where(weak, 0.7, t1) - 1 + noise_out

    def cost(translation, floor):
        return float((mind(translation, noise_floor=floor) - mind(source, noise_floor=floor)).abs().mean(1)[0][weak].mean())

    assert cost(erased, 3.0) > 2 * cost(truth, 3.0)
    assert cost(erased, 30.0) < cost(truth, 30.0)  # a floor far above the weak edge's distances forgets it


def test_the_mind_noise_floor_leaves_a_slice_without_head_as_heinrichs_mind():
    """A slice with no head pixel (an empty end of the volume) has no noise level, so it gets no floor, and the
    others in its batch keep theirs."""
    batch = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch[1] = -1.0
    described = mind(batch, noise_floor=3.0)
    assert torch.isfinite(described).all()
    torch.testing.assert_close(described[1], mind(batch[1:2])[0])
    torch.testing.assert_close(described[2], mind(batch[2:3], noise_floor=3.0)[0])
    assert not torch.allclose(described[2], mind(batch[2:3])[0])


def test_the_mind_noise_floor_reaches_the_structure_term_and_nothing_else(tmp_path):
    config = load_config(["--data", str(tmp_path), "--out", str(tmp_path / "run"), "--mind_noise_floor", "3"])
    assert Objective.from_config(config).mind_noise_floor == 3.0
    gens, discs, real_a, real_b = tiny_cycle_gan()
    _, without = generator_losses(gens, discs, real_a, real_b, Objective(cycle=10.0, structure=5.0))
    _, floored = generator_losses(gens, discs, real_a, real_b, Objective(cycle=10.0, structure=5.0, mind_noise_floor=3.0))
    assert floored["structure"] < without["structure"]
    torch.testing.assert_close(floored["G"] - floored["structure"], without["G"] - without["structure"])


def cycle_nce(nce: PatchNCE, g_ab, g_ba, real_a, real_b, fake_a, fake_b) -> torch.Tensor:
    """PatchNCE over the four passes of a cycle, in the order CycleGenerators makes them."""
    with nce.recording() as calls:
        g_ab(real_a), g_ba(real_b), g_ba(fake_b), g_ab(fake_a)
    return nce(calls, len(real_a))


def test_patch_nce_rewards_a_translation_whose_patches_stay_in_place():
    """Two identical generators and heads: a 'translation' equal to its input matches patch for patch; the same
    image mirrored (every patch moved) does not."""
    torch.manual_seed(0)
    g_ab = build_generator("unet", 32, 8)
    g_ba = copy.deepcopy(g_ab)
    nce = PatchNCE(g_ab, g_ba, patches=64)
    nce.heads["g_ba"].load_state_dict(nce.heads["g_ab"].state_dict())
    real_a, real_b = torch.rand(2, 1, 32, 32) * 2 - 1, torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        in_place = cycle_nce(nce, g_ab, g_ba, real_a, real_b, real_b, real_a)
        mirrored = cycle_nce(nce, g_ab, g_ba, real_a, real_b, real_b.flip(-1), real_a.flip(-1))
    # random-init features of different places are alike (cosine ~0.9), so even in place the loss is not near 0
    assert in_place < 0.75 * mirrored, (in_place, mirrored)
    assert all(not m._forward_hooks for m in [*g_ab.modules(), *g_ba.modules()]), "recording removes its hooks"


def tiny_cycle_gan():
    """Seeded 32x32 generators, discriminators and a batch of 2 per domain, for the generator-loss tests."""
    torch.manual_seed(0)
    gens = CycleGenerators(build_generator("unet", 32, 4), build_generator("unet", 32, 4))
    discs = Discriminators(build_discriminator(4), build_discriminator(4))
    real_a, real_b = torch.rand(2, 1, 32, 32) * 2 - 1, torch.rand(2, 1, 32, 32) * 2 - 1
    return gens, discs, real_a, real_b


def test_patch_nce_reads_the_cycle_passes_and_trains_generators_and_heads():
    """No generator pass is added for it (2 + 2 calls without identity, the first batched with the identity
    pass with it), it adds to G, and its gradient reaches the generators and both projection heads."""
    gens, discs, real_a, real_b = tiny_cycle_gan()
    nce = PatchNCE(gens.g_ab, gens.g_ba)
    calls = []
    gens.g_ab.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    for lambda_identity, expected in ((0.0, [2, 2]), (0.5, [4, 2])):
        calls.clear()
        _, plain = generator_losses(gens, discs, real_a, real_b, Objective(cycle=10.0, identity=lambda_identity))
        torch.manual_seed(1)
        _, losses = generator_losses(gens, discs, real_a, real_b, Objective(cycle=10.0, identity=lambda_identity, nce=2.0), nce)
        assert calls == expected + expected
        assert losses["nce"] > 0 and plain["nce"] == 0
        torch.testing.assert_close(losses["G"] - losses["nce"], plain["G"], atol=1e-5, rtol=1e-5)
    gens.zero_grad()
    losses["nce"].backward()
    for net in (gens.g_ab, gens.g_ba, nce.heads["g_ab"], nce.heads["g_ba"]):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_image_pool_returns_history_and_round_trips_its_state():
    pool = ImagePool(size=3, seed=0)
    for value in range(3):
        assert torch.equal(pool.query(torch.full((1, 1, 2, 2), float(value))), torch.full((1, 1, 2, 2), float(value)))
    state = pool.state_dict()
    clone = ImagePool(size=3, seed=99)
    clone.load_state_dict(state)
    batch = torch.full((8, 1, 2, 2), 10.0)
    out_a, out_b = pool.query(batch), clone.query(batch)
    assert torch.equal(out_a, out_b), "same history and RNG, same answer"
    assert {float(v) for v in out_a[:, 0, 0, 0]} - {10.0}, "some images come from the history"


def test_identity_passes_are_skipped_when_the_identity_loss_is_off():
    gens, discs, real_a, real_b = tiny_cycle_gan()
    calls = []
    gens.g_ab.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    with_identity, losses_on = generator_losses(gens, discs, real_a, real_b, Objective(cycle=10.0, identity=0.5))
    assert calls == [4, 2] and losses_on["identity"] > 0  # translation + identity in one batch, then the cycle
    calls.clear()
    without, losses_off = generator_losses(gens, discs, real_a, real_b, Objective(cycle=10.0))
    assert calls == [2, 2] and "idt_b" not in without and losses_off["identity"] == 0
    for key in ("fake_a", "fake_b", "rec_a", "rec_b"):  # instance norm: the batch it rode in changes nothing
        torch.testing.assert_close(without[key], with_identity[key], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses_off["G"], losses_on["G"] - losses_on["identity"], atol=1e-5, rtol=1e-5)


def test_lambda_adv_scales_only_the_adversarial_term():
    gens, discs, real_a, real_b = tiny_cycle_gan()
    _, reference = generator_losses(gens, discs, real_a, real_b, Objective(cycle=10.0, structure=5.0))
    _, quarter = generator_losses(gens, discs, real_a, real_b, Objective(cycle=10.0, structure=5.0, adv=0.25))
    assert reference["G_adv"] > 0
    torch.testing.assert_close(quarter["G_adv"], 0.25 * reference["G_adv"])
    torch.testing.assert_close(quarter["G"] - quarter["G_adv"], reference["G"] - reference["G_adv"])


@pytest.mark.parametrize("layers,patch", [(1, 16), (2, 34), (3, 70)])
def test_patchgan_depth_sets_the_patch_each_logit_judges(layers, patch):
    disc = build_discriminator(4, layers)
    for i, module in enumerate(disc.model):  # instance norm's statistics span the whole image; the convolutions don't
        if isinstance(module, torch.nn.InstanceNorm2d):
            disc.model[i] = torch.nn.Identity()
    image = torch.rand(1, 1, 128, 128, requires_grad=True)
    logits = disc(image)
    logits[0, 0, logits.shape[2] // 2, logits.shape[3] // 2].backward()
    rows, cols = image.grad[0, 0].abs().gt(0).nonzero().unbind(1)
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (patch, patch)
    with pytest.raises(ValueError, match="at least 1 layer"):
        build_discriminator(4, 0)


def test_laplace_nll_fits_the_scale_to_the_mean_error_and_leaves_the_translation_alone():
    torch.manual_seed(0)
    target = torch.rand(2, 1, 16, 16)
    mean = (target + 0.2 * torch.randn_like(target)).requires_grad_()
    log_scale = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.Adam([log_scale], lr=0.05)
    for _ in range(400):
        optimizer.zero_grad()
        laplace_nll(target, mean, log_scale.exp().expand_as(mean)).backward()
        optimizer.step()
    assert log_scale.exp().item() == pytest.approx((target - mean).abs().mean().item(), rel=0.02)
    assert mean.grad is None  # the translation learns from its own losses only


def test_the_aleatoric_term_needs_and_fits_the_reconstructions_scales():
    torch.manual_seed(0)
    gens = CycleGenerators(*(build_generator("unet", 32, 4, scale_head=True) for _ in range(2)))
    discs = Discriminators(build_discriminator(4), build_discriminator(4))
    real_a, real_b = torch.rand(2, 1, 32, 32) * 2 - 1, torch.rand(2, 1, 32, 32) * 2 - 1
    fakes, losses = generator_losses(gens, discs, real_a, real_b, Objective(cycle=10.0, aleatoric=2.0))
    expected = 2.0 * (laplace_nll(real_a, fakes["rec_a"], fakes["rec_a_scale"]) + laplace_nll(real_b, fakes["rec_b"], fakes["rec_b_scale"]))
    assert torch.allclose(losses["aleatoric"], expected)
    assert torch.allclose(losses["G"], sum(losses[k] for k in ("G_adv", "cycle", "identity", "structure", "nce", "aleatoric")))
    _, off = generator_losses(gens, discs, real_a, real_b, Objective(cycle=10.0))
    assert off["aleatoric"] == 0


def test_equivariance_moves_are_drawn_from_seed_and_step_and_reach_every_phase():
    moves = [move_at(step, seed=3) for step in range(400)]
    assert moves == [move_at(step, seed=3) for step in range(400)], "a resumed run draws the same moves"
    assert moves != [move_at(step, seed=4) for step in range(400)]
    assert {flip for flip, _ in moves} == {False, True}
    assert {dy for _, (dy, _) in moves} == {dx for _, (_, dx) in moves} == set(range(-MAX_SHIFT, MAX_SHIFT + 1))


def test_the_equivariance_term_is_zero_for_a_pointwise_translation_and_measures_what_tta_averages():
    """A per-pixel generator commutes with flips and shifts; a U-Net's moved translation, run in the same batch
    as its plain one, is exactly its translation of the moved input, and differs from the plain one moved."""
    gens, discs, real_a, real_b = tiny_cycle_gan()
    move = (True, (3, -2))
    pointwise = CycleGenerators(torch.nn.Conv2d(1, 1, 1), torch.nn.Conv2d(1, 1, 1))
    _, losses = generator_losses(pointwise, discs, real_a, real_b, Objective(equivariance=10.0), move=move)
    assert losses["equivariance"] < 1e-6
    fakes, losses = generator_losses(gens, discs, real_a, real_b, Objective(equivariance=10.0), move=move)
    torch.testing.assert_close(fakes["moved_fake_b"], gens.g_ab(flip_shift(real_a, *move)), atol=1e-5, rtol=1e-5)
    expected = 10.0 * sum((fakes[f"moved_{k}"] - flip_shift(fakes[k], *move)).abs().mean() for k in ("fake_a", "fake_b"))
    torch.testing.assert_close(losses["equivariance"], expected)
    assert losses["equivariance"] > 0.01
    torch.testing.assert_close(losses["G"], sum(losses[k] for k in ("G_adv", "cycle", "identity", "structure", "nce", "aleatoric",
                                                                    "equivariance")))
    with pytest.raises(ValueError, match="needs a move"):
        generator_losses(gens, discs, real_a, real_b, Objective(equivariance=1.0))


def test_the_equivariance_weight_rises_linearly_over_its_warmup_and_no_other_weight_moves():
    objective = Objective(cycle=5.0, structure=10.0, equivariance=30.0, equivariance_warmup=2000)
    assert [objective.at(step).equivariance for step in (0, 500, 1000, 2000, 12000)] == [0.0, 7.5, 15.0, 30.0, 30.0]
    assert replace(objective.at(500), equivariance=30.0) == objective
    assert Objective(equivariance=10.0).at(0) == Objective(equivariance=10.0), "no warm-up: the weight from the first step"


def test_cycle_noise_is_drawn_from_seed_step_and_rank():
    def draw(step, seed, rank):
        return torch.randn(4, generator=noise_at(step, seed, rank, torch.device("cpu")))

    assert torch.equal(draw(7, 0, 1), draw(7, 0, 1)), "a resumed run draws the same noise"
    assert not torch.equal(draw(7, 0, 0), draw(7, 0, 1)), "ranks draw their own"
    assert not torch.equal(draw(7, 0, 0), draw(8, 0, 0)) and not torch.equal(draw(7, 0, 0), draw(7, 1, 0))


def test_dropout_masks_are_drawn_from_seed_step_and_rank_and_the_global_rng_is_left_as_it_was():
    drop, ones, cpu = torch.nn.Dropout(0.5), torch.ones(1000), torch.device("cpu")

    def draw(step, seed, rank, enabled=True):
        with dropout_masks_at(step, seed, rank, cpu, enabled):
            return drop(ones)

    torch.manual_seed(123)
    before = torch.get_rng_state()
    mask = draw(7, 0, 1)
    assert torch.equal(torch.get_rng_state(), before), "the data pipeline's draws are not moved"
    assert torch.equal(mask, draw(7, 0, 1)), "a resumed run draws the same masks"
    assert not torch.equal(mask, draw(7, 0, 0)), "ranks draw their own"
    assert not torch.equal(mask, draw(8, 0, 1)) and not torch.equal(mask, draw(7, 1, 1))
    draw(7, 0, 1, enabled=False)
    assert not torch.equal(torch.get_rng_state(), before), "disabled, dropout draws from the global RNG as always"


def gain(value: float) -> torch.nn.Conv2d:
    conv = torch.nn.Conv2d(1, 1, 1, bias=False)
    torch.nn.init.constant_(conv.weight, value)
    return conv


def test_cycle_noise_makes_a_faint_encoding_costly_and_leaves_the_translations_alone():
    """A cycle that carries its input at a tenth of its amplitude and amplifies it back is exact without the noise.
    With it, the way back amplifies the noise tenfold into the reconstruction, and the loss's gradient asks the
    translation to carry its input louder than the noise."""
    _, discs, real_a, real_b = tiny_cycle_gan()
    faint = CycleGenerators(gain(0.1), gain(10.0))
    fakes, losses = generator_losses(faint, discs, real_a, real_b, Objective(cycle=5.0))
    assert losses["cycle"] < 1e-5
    objective = Objective(cycle=5.0, cycle_noise=0.05)
    noisy, losses = generator_losses(faint, discs, real_a, real_b, objective, noise=noise_at(0, 0, 0, real_a.device))
    torch.testing.assert_close(noisy["fake_b"], fakes["fake_b"])
    noise = torch.randn(real_a.shape, generator=noise_at(0, 0, 0, real_a.device)) * 0.05  # what G_ba's input got
    torch.testing.assert_close(noisy["rec_a"], real_a + 10.0 * noise, atol=1e-5, rtol=1e-5)
    assert losses["cycle"].item() == pytest.approx(5.0 * (10.0 + 0.1) * 0.05 * (2 / torch.pi) ** 0.5, rel=0.05)  # 5 E|10 n| + 5 E|0.1 n'|
    losses["G"].backward()
    assert faint.g_ab.weight.grad.item() < 0, "a louder translation lowers the loss"
    with pytest.raises(ValueError, match="cycle noise needs a generator"):
        generator_losses(faint, discs, real_a, real_b, objective)


def test_training_with_the_equivariance_term_brings_the_single_pass_to_the_tta_mean():
    """Same start, same cycle objective, 60 steps of a U-Net of depth 3 with resize-convolutions: with the
    term, its single pass lies much closer to the mean of its 10 flipped and shifted copies (what --tta
    outputs; measured 6 times closer), and it still reconstructs its inputs."""
    smooth = torch.nn.functional.avg_pool2d(torch.rand(8, 1, 40, 40), 9, stride=1)  # 32x32, structure at several scales
    images = (smooth - smooth.amin()) / (smooth.amax() - smooth.amin()) * 2 - 1
    train, held_out = images[:6], images[6:]

    def fit(equivariance: float):
        torch.manual_seed(0)
        gens = CycleGenerators(*(build_generator("unet", 32, 4, unet_depth=3, upsample="resize") for _ in range(2)))
        discs = Discriminators(build_discriminator(4), build_discriminator(4))
        optimizer = torch.optim.Adam(gens.parameters(), lr=2e-3)
        for step in range(60):
            batch = train[[step % 6, (step + 3) % 6]]
            _, losses = generator_losses(gens, discs, batch, batch.flip(-2), Objective(adv=0.0, cycle=5.0, equivariance=equivariance),
                                         move=move_at(step, 0))
            optimizer.zero_grad()
            losses["G"].backward()
            optimizer.step()
        with torch.no_grad():
            single = gens.g_ab(held_out)
            gap = (single - Translator([gens.g_ab], tta=True)(held_out)).abs().mean() / single.std()
            cycle = (gens.g_ba(gens.g_ab(held_out)) - held_out).abs().mean()
        return gap, cycle

    gap_without, cycle_without = fit(0.0)
    gap_with, cycle_with = fit(10.0)
    assert gap_with < 0.5 * gap_without, (gap_with, gap_without)
    assert cycle_with < 1.5 * cycle_without, (cycle_with, cycle_without)
