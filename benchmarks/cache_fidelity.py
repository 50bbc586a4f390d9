"""How far cached features are from what the uncached path computes, and from exact (float64) features.

    python benchmarks/cache_fidelity.py [--backbone resnet18] [--image-size 224] [--count 512] [--device cuda]

The feature cache runs the frozen prefix once, in inference mode, with its own batch size and memory
format; the uncached path runs it every step inside training, at the training batch size. On a GPU
these pick different convolution kernels, and cuDNN convolutions use TF32 by default, so the two
disagree in the last bits. This script measures by how much, per memory format, batch size and TF32
setting, against float64 features of the same images, and relative both to the features' size and to
their spread across images (what a linear head actually separates): a random-init backbone's features
are mostly a common offset, so the same noise is much larger against their spread.
"""

from __future__ import annotations

import argparse
from typing import Any

import harness
import torch
from PIL import Image

from finetune.data.features import frozen_prefix
from finetune.data.transforms import eval_transform
from finetune.model.backbones import build_backbone, preprocessing_for


def images_tensor(name: str, size: int, count: int, data: Any) -> torch.Tensor:
    """The first ``count`` test images through finetune's eval transform (resize, crop, normalise)."""
    images = harness.load_images(data)
    transform = eval_transform(preprocessing_for(name).at_size(size))
    return torch.stack([transform(Image.fromarray(x).convert("RGB")) for x in images.x_test[:count]])


def features(prefix: torch.nn.Module, x: torch.Tensor, batch_size: int, device: torch.device,
             channels_last_weights: bool, channels_last_input: bool, dtype: torch.dtype) -> torch.Tensor:
    model = prefix.to(device=device, dtype=dtype)
    model = model.to(memory_format=torch.channels_last if channels_last_weights else torch.contiguous_format)
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(device=device, dtype=dtype)
            if channels_last_input:
                xb = xb.contiguous(memory_format=torch.channels_last)
            out.append(model(xb).double().cpu())
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_args(parser)
    harness.add_model_data_args(parser, image_size=224)
    parser.add_argument("--count", type=int, default=512)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    if args.quick:
        args.image_size, args.count = 32, 16
    device = harness.resolve_device(parser, args)
    machine = harness.start(device)

    torch.manual_seed(args.seed)
    backbone = build_backbone(args.backbone, "none")
    prefix = frozen_prefix(backbone, len(backbone.stage_names))
    x = images_tensor(args.backbone, args.image_size, args.count, args.data)
    exact = features(prefix, x, 64, device, False, False, torch.float64)
    spread = (exact - exact.mean(0)).norm()
    print(f"{args.backbone}, {args.image_size} px, {len(x)} images, random init (seed {args.seed}); "
          f"reference: float64, NCHW. |features| / |spread across images| = {exact.norm() / spread:.1f}\n")

    variants = {  # name: (batch, channels_last weights, channels_last input)
        "cache extraction (default: channels_last, training batch 32)": (32, True, True),
        "cache extraction, channels_last, cache.batch_size=128": (128, True, True),
        "uncached path (channels_last weights, NCHW input, batch 32)": (32, True, False),
        "uncached, NCHW, batch 32": (32, False, False),
    }
    tf32_default = torch.backends.cudnn.allow_tf32
    results: dict[str, Any] = {}
    print(f"{'variant':<72}{'TF32':>6}{'rel. to size':>14}{'rel. to spread':>16}{'max abs':>11}")
    for tf32 in ([True, False] if device.type == "cuda" else [False]):
        torch.backends.cudnn.allow_tf32 = tf32
        got = {}
        for name, (batch, cl_weights, cl_input) in variants.items():
            f = features(prefix, x, batch, device, cl_weights, cl_input, torch.float32)
            got[name] = f
            diff = (f - exact).norm()
            row = {"rel_to_norm": float(diff / exact.norm()), "rel_to_spread": float(diff / spread),
                   "max_abs": float((f - exact).abs().max())}
            results[f"{name} | tf32={tf32}"] = row
            print(f"{name:<72}{'on' if tf32 else 'off':>6}{row['rel_to_norm']:>14.2e}{row['rel_to_spread']:>16.2e}"
                  f"{row['max_abs']:>11.2e}")
        names = list(variants)
        for label, key, cached in (("as configured", "cache vs uncached", names[0]),
                                   ("cache.batch_size=128", "cache (batch 128) vs uncached", names[1])):
            between = float((got[cached] - got[names[2]]).norm() / spread)
            results[f"{key} | tf32={tf32}"] = {"rel_to_spread": between}
            print(f"{'-> cache extraction vs uncached path, ' + label:<72}{'on' if tf32 else 'off':>6}"
                  f"{'':>14}{between:>16.2e}")
    torch.backends.cudnn.allow_tf32 = tf32_default
    harness.write_json(args.json, {"benchmark": "cache_fidelity", "machine": machine, "settings": vars(args) | {
        "data": str(args.data)}, "results": results})


if __name__ == "__main__":
    main()
