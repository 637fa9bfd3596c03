"""Image grids for reports: samples per class, reconstructions beside originals."""

import numpy as np


def image_grid(images: np.ndarray, columns: int = 8, pad: int = 1) -> np.ndarray:
    """uint8 (N, C, H, W) -> one uint8 (C, rows*(H+pad), columns*(W+pad)) image, row-major."""
    n, c, h, w = images.shape
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    grid = np.zeros((c, rows * (h + pad) + pad, columns * (w + pad) + pad), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y : y + h, x : x + w] = img
    return grid
