"""The denoising objective: Min-SNR-gamma weights and targets against values worked out by hand."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from ctrlnet_trainer.loss import denoising_loss, min_snr_weights, snr, training_target

# alpha_bar at timesteps 0..3, chosen so SNR = alpha_bar / (1 - alpha_bar) is easy to write down.
ALPHA_BAR = torch.tensor([0.9, 0.5, 0.1, 0.01], dtype=torch.float64)
T = torch.arange(4)
SNR = [9.0, 1.0, 1 / 9, 1 / 99]


def sd_scheduler(prediction_type="epsilon"):
    # Stable Diffusion's training schedule.
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
    )


def test_snr_by_hand():
    assert torch.allclose(snr(ALPHA_BAR, T), torch.tensor(SNR), rtol=1e-6)


def test_min_snr_weights_epsilon_by_hand():
    # min(SNR, 5) / SNR: only the low-noise step (SNR 9) is down-weighted.
    expected = torch.tensor([5 / 9, 1.0, 1.0, 1.0])
    assert torch.allclose(min_snr_weights(ALPHA_BAR, T, 5.0, "epsilon"), expected, rtol=1e-6)


def test_min_snr_weights_v_prediction_by_hand():
    # min(SNR, 5) / (SNR + 1)
    expected = torch.tensor([5 / 10, 1 / 2, (1 / 9) / (10 / 9), (1 / 99) / (100 / 99)])
    assert torch.allclose(min_snr_weights(ALPHA_BAR, T, 5.0, "v_prediction"), expected, rtol=1e-6)
    assert torch.allclose(expected, torch.tensor([0.5, 0.5, 0.1, 0.01]))


def test_min_snr_weights_reject_unknown_prediction_type():
    with pytest.raises(ValueError, match="sample"):
        min_snr_weights(ALPHA_BAR, T, 5.0, "sample")
    with pytest.raises(ValueError, match="sample"):
        training_target(
            sd_scheduler(), torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.zeros(1).long(), "sample"
        )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [1.0, 5.0, 20.0])
def test_weights_match_the_diffusers_examples_formula(prediction_type, gamma):
    """The formula in diffusers' train_text_to_image.py, built on training_utils.compute_snr."""
    scheduler = sd_scheduler(prediction_type)
    timesteps = torch.tensor([0, 1, 10, 100, 250, 500, 750, 999])
    s = compute_snr(scheduler, timesteps)
    reference = torch.stack([s, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    reference = reference / s if prediction_type == "epsilon" else reference / (s + 1)
    ours = min_snr_weights(scheduler.alphas_cumprod, timesteps, gamma, prediction_type)
    assert torch.allclose(ours, reference.float(), rtol=1e-5)


def test_loss_without_gamma_is_plain_mse():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    loss = denoising_loss(pred, target, T, ALPHA_BAR, "epsilon", None)
    assert torch.allclose(loss, ((pred - target) ** 2).mean())
    assert torch.allclose(loss, F.mse_loss(pred, target))
    # fp32 even when the model predicts in bf16
    assert denoising_loss(pred.bfloat16(), target.bfloat16(), T, ALPHA_BAR, "epsilon", None).dtype == torch.float32


@pytest.mark.parametrize(
    "prediction_type,weights",
    [
        ("epsilon", [5 / 9, 1.0, 1.0, 1.0]),
        ("v_prediction", [0.5, 0.5, 0.1, 0.01]),
    ],
)
def test_loss_with_gamma_is_the_weighted_per_sample_mean(prediction_type, weights):
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    per_sample = [((pred[i] - target[i]) ** 2).mean().item() for i in range(4)]
    expected = sum(w * e for w, e in zip(weights, per_sample, strict=False)) / 4
    loss = denoising_loss(pred, target, T, ALPHA_BAR, prediction_type, 5.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # not the unweighted loss (the weights really apply)
    assert loss.item() != pytest.approx(sum(per_sample) / 4, rel=1e-3)


def test_epsilon_target_is_the_noise():
    noise = torch.randn(2, 4, 4, 4)
    assert training_target(sd_scheduler(), torch.randn(2, 4, 4, 4), noise, torch.tensor([3, 700]), "epsilon") is noise


def test_v_target_by_hand():
    scheduler = sd_scheduler("v_prediction")
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    t = torch.tensor([0, 400, 999])
    ab = scheduler.alphas_cumprod[t].view(3, 1, 1, 1)
    expected = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    assert torch.allclose(training_target(scheduler, x0, noise, t, "v_prediction"), expected, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.5, 5.0])
def test_min_snr_is_the_same_x0_weighting_for_both_prediction_types(gamma):
    """For one x0 estimate, the weighted epsilon loss, the weighted v loss and
    min(SNR, gamma) * ||x0 - x0_hat||^2 are the same number (the paper's point)."""
    scheduler = sd_scheduler()
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    x0_hat = x0 + 0.1 * torch.randn(3, 4, 4, 4, generator=g)
    t = torch.tensor([20, 300, 900])
    ab = scheduler.alphas_cumprod[t].view(3, 1, 1, 1).double()
    a, s = ab.sqrt(), (1 - ab).sqrt()
    x0, noise, x0_hat = x0.double(), noise.double(), x0_hat.double()
    xt = a * x0 + s * noise
    eps_hat = (xt - a * x0_hat) / s
    v, v_hat = a * noise - s * x0, a * eps_hat - s * x0_hat

    x0_err = ((x0 - x0_hat) ** 2).mean(dim=(1, 2, 3))
    expected = (torch.clamp(snr(scheduler.alphas_cumprod, t).double(), max=gamma) * x0_err).mean()
    eps_loss = denoising_loss(eps_hat, noise, t, scheduler.alphas_cumprod, "epsilon", gamma)
    v_loss = denoising_loss(v_hat, v, t, scheduler.alphas_cumprod, "v_prediction", gamma)
    assert eps_loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert v_loss.item() == pytest.approx(expected.item(), rel=1e-4)
