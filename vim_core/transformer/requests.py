"""Checks on what a client sends a served model: class ids, images and sampling options.

Everything is checked before any work, so a bad request costs nothing and gets one line saying what is
wrong (a BadRequest, which flows/pyfunc_models.py turns into HTTP 400). Without these checks torch
answers for us, with 500s such as "probability tensor contains either inf, nan" (a NaN temperature) or
"All arrays must be of the same length" (batch_size -1).

Policy (docs/reliability.md): a value that can only mean one thing is clamped, anything else refused.
- clamped: top_k above the codebook size (to the codebook size: the filter keeps every token anyway);
  batch_size above the number of images (to that number: the same draws, the same images).
- refused: anything not a number (text, booleans, lists, null), NaN and infinities, a float where an
  integer is meant (2.5 for top_k; 3.0 is taken as 3), and values out of range: temperature outside
  0..MAX_TEMPERATURE (0 is greedy), top_k < 0 (0 is off), top_p outside (0, 1] (1 is off), cfg_scale
  outside 0..MAX_CFG_SCALE, seed outside 0..2**63-1, batch_size < 1.
- inputs: class ids must be a flat, non-empty list of integers (a DataFrame column, a list, an array or
  {"class_id": [...]}), at most `cap` of them, each in 0..num_classes-1 (any integer >= 0 for an
  unconditional model, where the ids only count the images), or UNCONDITIONAL (-1) where the served
  model holds an unconditional copy (transformer.uncond). Images to encode must be whole numbers in
  0..255 of the model's shape.
"""

import math
import numbers

import numpy as np

from vim_core.errors import VimError

MAX_TEMPERATURE = 100.0
MAX_CFG_SCALE = 100.0
MAX_SEED = 2**63 - 1
MAX_CLASS_ID = 2**31 - 1  # for unconditional models; conditional ones are bounded by num_classes
UNCONDITIONAL = -1  # the class id that asks a class-conditional model's unconditional copy for an image
DEFAULTS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "cfg_scale": 1.0, "seed": 0, "batch_size": 64}


class BadRequest(VimError):
    """A request a served model refuses before any work: the caller's mistake (HTTP 400)."""


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BadRequest(f"{name} must be a number, got {_shown(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise BadRequest(f"{name} must be finite, got {value}")
    return value


def _integer(name: str, value) -> int:
    number = _number(name, value)
    if number != int(number):
        raise BadRequest(f"{name} must be an integer, got {number}")
    return int(number)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _within(name: str, value: float, low: float, high: float, note: str = "") -> None:
    if not low <= value <= high:
        raise BadRequest(f"{name} must be in {low:g}..{high:g}{note}, got {value:g}")


def sampling_options(opts: dict, n_images: int, vocab_size: int) -> dict:
    """The checked, clamped sampling options for sample(): temperature, top_k, top_p, cfg_scale, seed,
    batch_size, with None for a filter that is off. `opts` holds the model's defaults under the request's."""
    o = {**DEFAULTS, **{k: v for k, v in opts.items() if k in DEFAULTS}}
    temperature = _number("temperature", o["temperature"])
    _within("temperature", temperature, 0.0, MAX_TEMPERATURE, " (0 is greedy)")
    top_k = _integer("top_k", o["top_k"])
    if top_k < 0:
        raise BadRequest(f"top_k must be >= 0 (0 is off), got {top_k}")
    top_p = _number("top_p", o["top_p"])
    if not 0.0 < top_p <= 1.0:
        raise BadRequest(f"top_p must be in (0, 1] (1 is off), got {top_p:g}")
    cfg_scale = _number("cfg_scale", o["cfg_scale"])
    _within("cfg_scale", cfg_scale, 0.0, MAX_CFG_SCALE)
    seed = _integer("seed", o["seed"])
    _within("seed", seed, 0, MAX_SEED)
    batch_size = _integer("batch_size", o["batch_size"])
    if batch_size < 1:
        raise BadRequest(f"batch_size must be >= 1, got {batch_size}")
    return {
        "temperature": temperature,
        "top_k": min(top_k, vocab_size) if top_k > 0 else None,
        "top_p": top_p if top_p < 1.0 else None,
        "cfg_scale": cfg_scale,
        "seed": seed,
        "batch_size": min(batch_size, max(n_images, 1)),
    }


def class_ids(
    values, num_classes: int, cap: int, cap_note: str = "", unconditional: bool = False
) -> np.ndarray:
    """int64 class ids from a flat sequence (already taken out of a DataFrame or dict by the caller);
    cap_note follows the cap in the refusal (how the server's operator raises it). `unconditional`: the
    model has an unconditional copy, so UNCONDITIONAL is an id too."""
    if isinstance(values, (str, bytes)):
        raise BadRequest(f"class ids must be integers, got text {_shown(values)}")
    if np.isscalar(values) or isinstance(values, numbers.Number):
        values = [values]
    try:
        arr = np.asarray(values, dtype=object)
    except ValueError:  # ragged nesting
        raise BadRequest("class ids must be a flat list of integers, got nested lists") from None
    if arr.ndim == 2 and arr.shape[1] == 1:  # one column of a 2-D array: a column vector
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise BadRequest(f"class ids must be a flat list of integers, got shape {arr.shape}")
    if arr.size == 0:
        raise BadRequest("the request holds no class ids; send at least one")
    if arr.size > cap:
        raise BadRequest(f"{arr.size} class ids in one request; at most {cap}{cap_note}")
    ids = [_class_id(v) for v in arr]
    high = num_classes - 1 if num_classes > 0 else MAX_CLASS_ID
    low = UNCONDITIONAL if unconditional and num_classes > 0 else 0
    bad = [i for i in ids if not low <= i <= high]
    if bad:
        also = f" ({UNCONDITIONAL}: an unconditional image)" if low < 0 else ""
        raise BadRequest(f"class ids must be in {low}..{high}{also}, got {bad[:5]}")
    return np.asarray(ids, dtype=np.int64)


def _class_id(value) -> int:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (str, bytes)):
        raise BadRequest(f"class ids must be integers, got text {_shown(value)}")
    if isinstance(value, (list, tuple, dict, np.ndarray)):
        raise BadRequest("class ids must be a flat list of integers, got nested lists")
    if value is None:
        raise BadRequest("class ids must be integers, got null")
    return _integer("class id", value)


def images_uint8(images, shape: tuple[int, int, int], cap: int, cap_note: str = "") -> np.ndarray:
    """uint8 images (N, C, H, W) from (N, C, H, W) or (N, H, W) whole numbers in 0..255."""
    try:
        x = np.asarray(images)
    except ValueError:
        raise BadRequest("images must be a rectangular array, got nested lists of uneven lengths") from None
    if x.ndim == 3:  # (N, H, W): one channel
        x = x[:, None]
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape) or x.shape[0] == 0:
        raise BadRequest(f"images must be uint8 (N, {', '.join(map(str, shape))}) with N >= 1, got {x.shape}")
    if x.shape[0] > cap:
        raise BadRequest(f"{x.shape[0]} images in one request; at most {cap}{cap_note}")
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind not in "iuf":
        raise BadRequest(f"images must hold numbers in 0..255, got {x.dtype}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise BadRequest("images must hold numbers in 0..255, got NaN or infinity")
    if x.min() < 0 or x.max() > 255 or (x.dtype.kind == "f" and not np.equal(np.mod(x, 1), 0).all()):
        raise BadRequest(f"images must hold whole numbers in 0..255, got {x.min()}..{x.max()}")
    return x.astype(np.uint8)
