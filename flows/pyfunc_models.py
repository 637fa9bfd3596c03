"""MLflow pyfunc models: the tokenizer (vit-vqgan), the Transformer (vim-transformer), and the generator
(vim-generator) that samples tokens with the one and decodes them with the other.

This file is logged as models-from-code (flows/publish.py): MLflow stores it with each model and runs it
on load. The weights are the pipeline's own safetensors files, stored as the model's artifacts and read
by vim_core's loaders; the vim_core source travels in the model's code folder, so no pickled object is
ever loaded. model_config is {kind: sampling defaults}: its key says which of the three a logged model
is, its value holds the sampling options the pipeline evaluated with.

- vit-vqgan: uint8 images (N, C, H, W) or (N, H, W) -> int64 token grids (N, L).
- vim-transformer: class ids -> int64 token grids (N, L).
- vim-generator: class ids -> one row per image: class_id and image_png (a base64 PNG).

Class ids come as a DataFrame with a `class_id` column (what `mlflow models serve` hands over for
{"dataframe_records": [{"class_id": 3}]}), or a list or array of ints. Sampling options are predict
params: temperature, top_k (0: off), top_p (1.0: off), cfg_scale, seed, batch_size.

A request holds at most max_images() images (class ids, or images to encode): 256, or the
VIM_MAX_IMAGES_PER_REQUEST environment variable of the serving process. A bigger one is refused with
HTTP 400 before any work, so one request cannot hold a server for hours or exhaust its memory.
"""

import base64
import io
import os

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

KINDS = ("tokenizer", "transformer", "generator")
SAMPLING = ("temperature", "top_k", "top_p", "cfg_scale", "seed", "batch_size")


MAX_IMAGES_PER_REQUEST = 256
MAX_IMAGES_ENV = "VIM_MAX_IMAGES_PER_REQUEST"


def max_images() -> int:
    """Images one request may ask for: VIM_MAX_IMAGES_PER_REQUEST, else MAX_IMAGES_PER_REQUEST."""
    text = os.environ.get(MAX_IMAGES_ENV, "")
    return int(text) if text.strip().isdigit() and int(text) > 0 else MAX_IMAGES_PER_REQUEST


def _check_count(n: int, what: str) -> None:
    cap = max_images()
    if n > cap:
        raise _bad_input(f"{n} {what} in one request; at most {cap} (set {MAX_IMAGES_ENV} on the server)")


def _bad_input(message: str) -> Exception:
    """An error `mlflow models serve` answers with HTTP 400, not 500."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def class_ids(model_input) -> np.ndarray:
    """int64 class ids from a DataFrame (`class_id` column, else its only column), list, array or dict."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if "class_id" in model_input.columns:
            column = model_input["class_id"]
        elif len(model_input.columns) == 1:
            column = model_input.iloc[:, 0]
        else:
            raise _bad_input(f"expected a class_id column, got {list(model_input.columns)}")
        values = column.to_numpy()
    elif isinstance(model_input, dict):
        values = np.asarray(model_input.get("class_id", []))
    else:
        values = np.asarray(model_input)
    values = values.reshape(-1)
    if values.size and not np.all(np.equal(np.mod(values.astype(float), 1), 0)):
        raise _bad_input("class ids must be integers")
    return values.astype(np.int64)


def png_base64(image: np.ndarray) -> str:
    """One uint8 image (C, H, W) as a base64-encoded PNG."""
    from PIL import Image

    arr = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(text: str) -> np.ndarray:
    """The inverse of png_base64, as (H, W) or (H, W, C) uint8; for clients and tests."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


class VimModel(PythonModel):
    """One of the three models, picked by the key of model_config when MLflow loads it."""

    def load_context(self, context) -> None:
        import torch

        from vim_core.tokenizer.export import load_tokenizer
        from vim_core.transformer.export import load_transformer

        # {kind: sampling defaults}; keyed by kind because MLflow also logs model_config as run params,
        # and the three models share one run.
        config = dict(context.model_config or {})
        kinds = [k for k in config if k in KINDS]
        if len(kinds) != 1:
            raise ValueError(f"model_config must have one key of {KINDS}, got {list(config)}")
        self.kind = kinds[0]
        self.defaults = {k: v for k, v in (config[self.kind] or {}).items() if k in SAMPLING}
        self.device = torch.device("cpu")
        self.tokenizer = self.transformer = None
        if self.kind in ("tokenizer", "generator"):
            self.tokenizer = load_tokenizer(context.artifacts["tokenizer"]).eval()
        if self.kind in ("transformer", "generator"):
            self.transformer, _ = load_transformer(context.artifacts["transformer"])

    def predict(self, context, model_input, params: dict | None = None):
        if self.kind == "tokenizer":
            return self.encode(model_input)
        ids = class_ids(model_input)
        _check_count(len(ids), "class ids")
        tokens = self.sample(ids, {**self.defaults, **(params or {})})
        if self.kind == "transformer":
            return tokens.numpy()
        return self.images(ids, tokens)

    def encode(self, images) -> np.ndarray:
        x = np.asarray(images)
        if x.ndim == 3:  # (N, H, W): one channel
            x = x[:, None]
        want = (self.tokenizer.channels, self.tokenizer.image_size, self.tokenizer.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise _bad_input(f"images must be uint8 (N, {', '.join(map(str, want))}), got {x.shape}")
        _check_count(len(x), "images")
        return self.tokenizer.encode_uint8(x.astype(np.uint8)).numpy().astype(np.int64)

    def sample(self, ids: np.ndarray, opts: dict):
        import torch

        from vim_core.errors import VimError
        from vim_core.transformer.sampling import sample

        model = self.transformer
        n = len(ids)
        if model.num_classes > 0:
            bad = ids[(ids < 0) | (ids >= model.num_classes)]
            if bad.size:
                raise _bad_input(f"class ids must be in 0..{model.num_classes - 1}, got {bad[:5].tolist()}")
            labels = torch.from_numpy(ids)
        else:
            labels = None  # unconditional: the ids only say how many images
        top_k = int(opts.get("top_k") or 0)
        top_p = float(opts.get("top_p") if opts.get("top_p") is not None else 1.0)
        cfg_scale = float(opts.get("cfg_scale", 1.0))
        try:
            return sample(
                model,
                n,
                labels,
                temperature=float(opts.get("temperature", 1.0)),
                top_k=top_k if top_k > 0 else None,
                top_p=top_p if top_p < 1.0 else None,
                cfg_scale=cfg_scale if labels is not None else 1.0,
                seed=int(opts.get("seed", 0)),
                batch_size=int(opts.get("batch_size") or 64),
                device=self.device,
            )
        except VimError as err:
            raise _bad_input(str(err)) from None

    def images(self, ids: np.ndarray, tokens):
        import pandas as pd

        pixels = self.tokenizer.decode_uint8(tokens)
        return pd.DataFrame({"class_id": ids, "image_png": [png_base64(img) for img in pixels]})


mlflow.models.set_model(VimModel())
