"""Which timm architectures finetune cuts into stages: one model per family, on the meta device (no memory).

    python benchmarks/timm_coverage.py [--models resnet50,convnext_tiny,...]

For each model prints its stages and pooled width, or the one-paragraph refusal a user would see. Needs timm.
"""

from __future__ import annotations

import argparse
import time

from finetune.errors import SetupError
from finetune.model.backbones import empty_backbone

MODELS = ["resnet50", "resnet18d", "resnext50_32x4d", "seresnet50", "efficientnet_b0", "tf_efficientnetv2_s",
          "mobilenetv3_large_100", "mobilenetv4_conv_small", "convnext_tiny", "convnextv2_atto", "regnety_002",
          "densenet121", "ghostnet_100", "rexnet_100", "dla34", "cspresnet50", "darknet53", "vgg11", "inception_v3",
          "levit_128s", "swin_tiny_patch4_window7_224", "swinv2_cr_tiny_ns_224", "deit_tiny_patch16_224",
          "deit_tiny_distilled_patch16_224", "vit_small_patch16_224", "beit_base_patch16_224",
          "eva02_tiny_patch14_224", "coat_tiny", "maxvit_tiny_tf_224", "coatnet_0_rw_224", "efficientformer_l1",
          "fastvit_t8", "mobilevit_xs", "poolformer_s12", "edgenext_xx_small", "hrnet_w18_small", "nfnet_l0",
          "repvgg_a0", "tinynet_e", "mixer_b16_224", "resmlp_12_224", "cait_xxs24_224", "xcit_nano_12_p16_224",
          "pvt_v2_b0", "twins_svt_small", "crossvit_tiny_240", "tnt_s_patch16_224", "focalnet_tiny_srf",
          "hiera_tiny_224", "inception_next_tiny"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma list of timm model names")
    args = parser.parse_args()
    cut, refused = [], []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        start = time.perf_counter()
        try:
            backbone = empty_backbone(f"timm/{model}")
        except SetupError as error:
            refused.append(model)
            print(f"refused  {model}: {str(error).split(': ', 1)[1].split('. ')[0]}")
            continue
        stages = backbone.stage_names
        cut.append(model)
        print(f"cut      {model}: {len(stages)} stages ({stages[0]} ... {stages[-1]}), {backbone.feature_dim}-d, "
              f"{time.perf_counter() - start:.1f} s")
    print(f"{len(cut)} of {len(cut) + len(refused)} cut; refused: {', '.join(refused) or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
