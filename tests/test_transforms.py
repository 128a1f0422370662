"""DeviceNormalize: the per-channel normalization of the tasks' on-device batches."""
import torch

from tasks.transforms import DeviceNormalize


def test_normalizes_uint8_scaled_pixels_like_a_float64_reference_and_keeps_its_tensors():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = torch.randint(0, 256, (2, 3, 4, 5)).float()
    normalize = DeviceNormalize(mean, std, scale=255)
    out = normalize(x)
    ref = (x.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    kept = normalize._tensors[x.device]
    normalize(x)
    assert normalize._tensors[x.device] is kept  # made once per device, not per batch
