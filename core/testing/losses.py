"""The loss checks: sign conventions, gradient signs, batch means (so micro-batches add up), and
real logits in the generator's loss (contract v2: ``generator_loss(fake_logits, real_logits=None)``,
``needs_real_logits``)."""

from __future__ import annotations

import torch

from core.interfaces import Loss
from core.testing.kit import SEED, Case, conformance_check, fail


def generator_loss(loss: Loss, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """G's loss as the training loop asks for it: with ``real_logits`` only when the loss
    ``needs_real_logits``."""
    if loss.needs_real_logits:
        return loss.generator_loss(fake, real_logits=real)
    return loss.generator_loss(fake)


@conformance_check("losses", covers=("discriminator_loss", "generator_loss"))
def check_loss_sign_conventions(case: Case) -> None:
    """Logits are "realness": D's loss is lower when real logits are high and fake ones low,
    G's loss is lower when fake logits are high (real logits at 0); both are finite scalars."""
    loss = case.create()
    high, low, zero = torch.full((4,), 3.0), torch.full((4,), -3.0), torch.zeros(4)
    good, bad = loss.discriminator_loss(high, low), loss.discriminator_loss(low, high)
    g_good, g_bad = generator_loss(loss, high, zero), generator_loss(loss, low, zero)
    for label, value in (("discriminator_loss", good), ("generator_loss", g_good)):
        if not isinstance(value, torch.Tensor) or value.ndim != 0 or not torch.isfinite(value):
            fail(case, f"{label} must return a finite scalar tensor, got {value!r:.80}")
    if not good < bad:
        fail(case, f"discriminator_loss(real=+3, fake=-3) = {good.item():.4g} is not below "
                   f"discriminator_loss(real=-3, fake=+3) = {bad.item():.4g}")
    if not g_good < g_bad:
        fail(case, f"generator_loss(fake=+3) = {g_good.item():.4g} is not below "
                   f"generator_loss(fake=-3) = {g_bad.item():.4g}")


@conformance_check("losses", covers=("discriminator_loss", "generator_loss"))
def check_loss_gradients(case: Case) -> None:
    """Gradients are finite and point the right way at logits near 0: raising a real logit never
    raises D's loss, raising a fake one never lowers it, raising a fake logit never raises G's
    loss; and each is nonzero there."""
    loss = case.create()
    rng = torch.Generator().manual_seed(SEED)
    real = (torch.rand(6, generator=rng) - 0.5).requires_grad_()
    fake = (torch.rand(6, generator=rng) - 0.5).requires_grad_()
    g_real, g_fake = torch.autograd.grad(loss.discriminator_loss(real, fake), [real, fake])
    fake_g = fake.detach().clone().requires_grad_()
    (g_gen,) = torch.autograd.grad(generator_loss(loss, fake_g, real.detach()), [fake_g])
    for label, g, sign in (("d(L_D)/d(real)", g_real, -1), ("d(L_D)/d(fake)", g_fake, 1),
                           ("d(L_G)/d(fake)", g_gen, -1)):
        if not torch.isfinite(g).all():
            fail(case, f"{label} is not finite")
        if bool((g * sign < 0).any()) or not bool((g * sign > 0).any()):
            fail(case, f"{label} must be {'<=' if sign < 0 else '>='} 0 and not all zero near "
                       f"logit 0, got {g.tolist()}")


@conformance_check("losses", covers=("discriminator_loss", "generator_loss", "needs_real_logits"))
def check_loss_is_a_batch_mean(case: Case) -> None:
    """Each loss is a mean over the batch: two halves' losses average to the whole batch's, so
    k accumulated micro-batches (each divided by k) equal one large batch. A relativistic loss
    (``needs_real_logits``) compares with averages over its micro-batch, so only this is
    required of it: the batch repeated twice gives the batch's loss (a mean, not a sum)."""
    loss = case.create()
    rng = torch.Generator().manual_seed(SEED)
    real, fake = torch.randn(8, generator=rng) * 2, torch.randn(8, generator=rng) * 2
    whole = loss.discriminator_loss(real, fake)
    g_whole = generator_loss(loss, fake, real)
    if not loss.needs_real_logits:
        halves = (loss.discriminator_loss(real[:4], fake[:4]) +
                  loss.discriminator_loss(real[4:], fake[4:])) / 2
        g_halves = (generator_loss(loss, fake[:4], real[:4]) +
                    generator_loss(loss, fake[4:], real[4:])) / 2
        if not torch.allclose(whole, halves, rtol=1e-5, atol=1e-6) or \
                not torch.allclose(g_whole, g_halves, rtol=1e-5, atol=1e-6):
            fail(case, f"the losses are not batch means: D {whole.item():.6g} vs halves "
                       f"{halves.item():.6g}; G {g_whole.item():.6g} vs halves "
                       f"{g_halves.item():.6g}")
    twice = loss.discriminator_loss(real.repeat(2), fake.repeat(2))
    g_twice = generator_loss(loss, fake.repeat(2), real.repeat(2))
    if not torch.allclose(whole, twice, rtol=1e-5, atol=1e-6) or \
            not torch.allclose(g_whole, g_twice, rtol=1e-5, atol=1e-6):
        fail(case, f"the losses are not batch means: D {whole.item():.6g} vs the batch twice "
                   f"{twice.item():.6g}; G {g_whole.item():.6g} vs the batch twice "
                   f"{g_twice.item():.6g}")


@conformance_check("losses", covers=("generator_loss", "needs_real_logits"))
def check_loss_real_logits(case: Case) -> None:
    """``needs_real_logits`` is a bool; ``generator_loss(fake_logits, real_logits=...)`` is
    accepted (contract v2); a loss that does not need real logits gives the same value with or
    without them, and one that does (relativistic losses) depends on them, with a finite
    gradient (the loop then runs D on reals in G's step)."""
    loss = case.create()
    needs = loss.needs_real_logits
    if not isinstance(needs, bool):
        fail(case, f"needs_real_logits must be True or False, got {needs!r}")
    rng = torch.Generator().manual_seed(SEED)
    fake = torch.randn(6, generator=rng)
    real = torch.randn(6, generator=rng).requires_grad_()
    other = torch.randn(6, generator=rng) + 1.0
    try:
        with_real = loss.generator_loss(fake, real_logits=real)
    except TypeError as exc:
        fail(case, f"generator_loss must accept real_logits (contract v2: "
                   f"generator_loss(fake_logits, real_logits=None)): {exc}")
    with_other = loss.generator_loss(fake, real_logits=other)
    if not needs:
        without = loss.generator_loss(fake)
        if not (torch.equal(with_real.detach(), without.detach())
                and torch.equal(with_other, without.detach())):
            fail(case, f"needs_real_logits is False, yet generator_loss changes with real_logits "
                       f"({without.item():.6g} without, {with_real.item():.6g} and "
                       f"{with_other.item():.6g} with two different ones): the loop passes them "
                       f"only to losses that declare needs_real_logits = True")
        return
    if torch.allclose(with_real.detach(), with_other.detach()):
        fail(case, f"needs_real_logits is True, yet generator_loss does not depend on "
                   f"real_logits ({with_real.item():.6g} for both of two different ones): the "
                   f"loop would run D on reals in G's step for nothing")
    (grad,) = torch.autograd.grad(with_real, [real], allow_unused=True)
    if grad is None or not torch.isfinite(grad).all():
        fail(case, "the generator loss has no finite gradient with respect to real_logits")
