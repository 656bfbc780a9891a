"""The method on a CUDA device gives the CPU's numbers (spec 2-8, 11); skipped on a machine without a GPU.

Training runs on GPUs, so the GPU path must give the numbers the CPU tests check by
hand: the smoothing prior, the selection weights, the whole objective with its
gradients, the confusion matrix, and a bf16 / channels_last training step.
"""

import pytest
import torch

from cromss_ray.method import CromSSLoss, ConfusionMatrix, build_model, selection_weights, smoothing_prior

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
CLASSES = 9
NODATA = 255


def seasonal_labels(samples: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """``(N, 4, H, W)`` labels with a no-data band, so the prior's empty-pixel rule is exercised too."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (samples, 4, height, width), generator=generator)
    labels[0, :, :5] = NODATA
    return labels


@pytest.mark.parametrize("kind", ["t", "s", "ts"])
def test_smoothing_prior_on_cuda_matches_the_cpu(kind):
    labels = seasonal_labels(3, 40, 56)
    season = torch.tensor([0, 2, 3])
    on_cpu = smoothing_prior(labels, season, kind, CLASSES)
    on_cuda = smoothing_prior(labels.to(CUDA), season.to(CUDA), kind, CLASSES)
    assert on_cuda.device.type == "cuda"
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("class_balanced", [True, False])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.75, 1.0])
def test_selection_weights_on_cuda_equal_the_cpu(ratio, class_balanced):
    generator = torch.Generator().manual_seed(1)
    confidence = torch.rand(4, 32, 32, generator=generator)
    y = torch.randint(0, CLASSES, (4, 32, 32), generator=generator)
    y[:, :2] = NODATA
    on_cpu = selection_weights(confidence, y, ratio, CLASSES, class_balanced)
    on_cuda = selection_weights(confidence.to(CUDA), y.to(CUDA), ratio, CLASSES, class_balanced)
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, atol=0, rtol=0)


def objective_and_gradients(device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    z1 = (3 * torch.randn(2, CLASSES, 32, 32, generator=generator)).to(device).requires_grad_()
    z2 = (3 * torch.randn(2, CLASSES, 32, 32, generator=generator)).to(device).requires_grad_()
    labels = seasonal_labels(2, 32, 32, seed=3).to(device)
    season = torch.tensor([1, 3], device=device)
    y = labels[torch.arange(2, device=device), season]
    prior = smoothing_prior(labels, season, "ts", CLASSES)
    criterion = CromSSLoss(classes=CLASSES, ramp_length=10, final_ratio=0.5)
    loss, diagnostics = criterion(z1, z2, y, prior=prior, epoch=5)
    loss.backward()
    return loss.detach(), diagnostics, [z1.grad, z2.grad]


def test_cromss_objective_and_its_gradients_on_cuda_match_the_cpu():
    loss_cpu, diagnostics_cpu, grads_cpu = objective_and_gradients(torch.device("cpu"))
    loss_cuda, diagnostics_cuda, grads_cuda = objective_and_gradients(CUDA)
    torch.testing.assert_close(loss_cuda.cpu(), loss_cpu, atol=1e-6, rtol=1e-5)
    assert diagnostics_cuda.keys() == diagnostics_cpu.keys()
    for key, value in diagnostics_cpu.items():
        torch.testing.assert_close(diagnostics_cuda[key].cpu(), value, atol=1e-6, rtol=1e-5, msg=key)
    for on_cuda, on_cpu in zip(grads_cuda, grads_cpu):
        torch.testing.assert_close(on_cuda.cpu(), on_cpu, atol=1e-7, rtol=1e-4)


def test_confusion_matrix_on_cuda_equals_the_cpu():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(3, CLASSES, 16, 16, generator=generator)
    target = torch.randint(0, CLASSES, (3, 16, 16), generator=generator)
    target[0, 0] = NODATA
    on_cpu = ConfusionMatrix(CLASSES, ignore_index=NODATA)
    on_cuda = ConfusionMatrix(CLASSES, ignore_index=NODATA, device=CUDA)
    on_cpu.update(logits, target)
    on_cuda.update(logits.to(CUDA), target.to(CUDA))
    assert torch.equal(on_cuda.matrix.cpu(), on_cpu.matrix)


@pytest.mark.parametrize("fusion", ["mid", "late"])
def test_bf16_channels_last_training_step_on_cuda_learns(fusion):
    """The GPU training path (bf16 autocast, channels_last): loss close to fp32 at the start, and falling."""
    torch.manual_seed(5)
    model = build_model(fusion, "resnet18", 2, 13, CLASSES).to(CUDA).to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(6)
    x1 = torch.rand(4, 2, 64, 64, generator=generator).to(CUDA).contiguous(memory_format=torch.channels_last)
    x2 = torch.rand(4, 13, 64, 64, generator=generator).to(CUDA).contiguous(memory_format=torch.channels_last)
    labels = seasonal_labels(4, 64, 64, seed=7).to(CUDA)
    season = torch.zeros(4, dtype=torch.long, device=CUDA)
    y = labels[:, 0]
    prior = smoothing_prior(labels, season, "ts", CLASSES)
    criterion = CromSSLoss(classes=CLASSES)
    model.eval()
    with torch.no_grad():
        reference, _ = criterion(*model(x1, x2), y, prior=prior)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            z1, z2 = model(x1, x2)
        assert z1.dtype == torch.bfloat16
        start, _ = criterion(z1, z2, y, prior=prior)
    torch.testing.assert_close(start, reference, atol=0, rtol=0.02)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            z1, z2 = model(x1, x2)
        loss, _ = criterion(z1, z2, y, prior=prior)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
