"""A small Vision Transformer from torchvision (random weights), as a switchhead-rewrite model file.

    switchhead-rewrite examples/vit_small.py --output /tmp/vit_out

torchvision's encoder layers use nn.MultiheadAttention (fused in-projection for Q, K and V). For
a pretrained model, return e.g. `torchvision.models.vit_b_16(weights="DEFAULT").eval()` from
`build_model()` and make the example images 224 x 224.
"""

import torch
from torchvision.models import VisionTransformer


def build_model():
    return VisionTransformer(image_size=64, patch_size=16, num_layers=4, num_heads=4, hidden_dim=128,
                             mlp_dim=256, num_classes=10).eval()


def example_inputs():
    return (torch.randn(2, 3, 64, 64),)
