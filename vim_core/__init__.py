"""vim: Vector-quantized Image Modeling with an improved ViT-VQGAN (Yu et al., 2021)."""

__version__ = "0.1.0"
