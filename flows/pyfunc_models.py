"""The MLflow pyfunc model `vim`: the generator, which samples tokens with the Transformer and decodes them
with the tokenizer. Class ids in, one row per image out: class_id and image_png (a base64 PNG).

This file is logged as models-from-code (flows/publish.py): MLflow stores it with the model and runs it
on load. The weights are the pipeline's own safetensors files, stored as the model's artifacts
(artifacts/tokenizer.safetensors and artifacts/transformer.safetensors, loadable on their own with
vim_core's loaders, docs/operations.md) and read by vim_core's loaders; the vim_core source travels in
the model's code folder, so no pickled object is ever loaded. model_config holds the sampling options
the pipeline evaluated with.

Class ids come as a DataFrame with a `class_id` column (what `mlflow models serve` hands over for
{"dataframe_records": [{"class_id": 3}]}), or a list or array of ints. Where the pipeline trained an
unconditional copy (transformer.uncond), its weights are the artifact transformer_uncond and class id -1
asks it for an unconditional image (docs/model.md says why it beats the null class). Sampling options are
predict params: temperature, top_k (0: off), top_p (1.0: off), cfg_scale, seed, batch_size; with a copy,
uncond_temperature, uncond_top_k and uncond_top_p are the -1 images' own (no guidance for those).

A request holds at most max_images() images: 256, or the
VIM_MAX_IMAGES_PER_REQUEST environment variable of the serving process. A bigger one is refused with
HTTP 400 before any work, so one request cannot hold a server for hours or exhaust its memory. Every
other input and sampling option is checked before any work too (vim_core.transformer.requests, which
says what is clamped and what is refused); a refusal is an MlflowException with error code
INVALID_PARAMETER_VALUE, which `mlflow models serve` answers with HTTP 400 and the one-line reason.
"""

import base64
import io
import os

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

SAMPLING = ("temperature", "top_k", "top_p", "cfg_scale", "seed", "batch_size")
UNCOND = "uncond_"  # the prefix of the options of the copy's draws, e.g. uncond_temperature


MAX_IMAGES_PER_REQUEST = 256
MAX_IMAGES_ENV = "VIM_MAX_IMAGES_PER_REQUEST"


def max_images() -> int:
    """Images one request may ask for: VIM_MAX_IMAGES_PER_REQUEST, else MAX_IMAGES_PER_REQUEST."""
    text = os.environ.get(MAX_IMAGES_ENV, "")
    return int(text) if text.strip().isdigit() and int(text) > 0 else MAX_IMAGES_PER_REQUEST


def _cap_note() -> str:
    return f" (set {MAX_IMAGES_ENV} on the server)"


def _bad_input(message: str) -> Exception:
    """An error `mlflow models serve` answers with HTTP 400, not 500."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _raw_class_ids(model_input):
    """The class ids as sent: a DataFrame's `class_id` column (else its only column), a dict's `class_id`
    entry, or the input itself (a list, an array, one number); checked by vim_core.transformer.requests."""
    import pandas as pd

    from vim_core.transformer.requests import BadRequest

    if isinstance(model_input, pd.DataFrame):
        if "class_id" in model_input.columns:
            return model_input["class_id"].to_numpy()
        # An unnamed column (MLflow names it 0) is the class ids; a column with another name is not.
        if len(model_input.columns) == 1 and not isinstance(model_input.columns[0], str):
            return model_input.iloc[:, 0].to_numpy()
        raise BadRequest(f"expected a class_id column, got {list(model_input.columns)[:5]}")
    if isinstance(model_input, pd.Series):
        return model_input.to_numpy()
    if isinstance(model_input, dict):
        if "class_id" not in model_input:
            raise BadRequest(
                f"a request given as a mapping needs a class_id key, got {list(model_input)[:5]}"
            )
        return model_input["class_id"]
    if model_input is None:
        raise BadRequest("the request holds no class ids; send at least one")
    return model_input


def class_ids(model_input, num_classes: int = 0, unconditional: bool = False) -> np.ndarray:
    """int64 class ids from a DataFrame (its `class_id` column, else its only, unnamed column), list, array
    or dict. MLflow's schema check runs first: it refuses text and fractions itself (also HTTP 400), and
    reads nested lists as rows whose first column is the class id, so those never reach this check."""
    from vim_core.transformer.requests import class_ids as checked

    return checked(_raw_class_ids(model_input), num_classes, max_images(), _cap_note(), unconditional)


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
    """The generator: class ids in, PNG images out."""

    def load_context(self, context) -> None:
        import torch

        from vim_core.tokenizer.export import load_tokenizer
        from vim_core.transformer.export import load_transformer

        config = context.model_config or {}
        self.defaults = {k: v for k, v in config.items() if k.removeprefix(UNCOND) in SAMPLING}
        self.device = torch.device("cpu")
        self.tokenizer = load_tokenizer(context.artifacts["tokenizer"]).eval()
        self.transformer, _ = load_transformer(context.artifacts["transformer"])
        copy = context.artifacts.get("transformer_uncond")
        self.uncond = load_transformer(copy)[0] if copy else None

    def predict(self, context, model_input, params: dict | None = None):
        import pandas as pd

        from vim_core.errors import VimError

        # Every refusal of vim_core's checks (and of sampling itself) is the caller's mistake: HTTP 400.
        try:
            ids = class_ids(model_input, self.transformer.num_classes, self.uncond is not None)
            tokens = self.sample(ids, {**self.defaults, **(params or {})})
        except VimError as err:
            raise _bad_input(str(err)) from None
        pixels = self.tokenizer.decode_uint8(tokens)
        return pd.DataFrame({"class_id": ids, "image_png": [png_base64(img) for img in pixels]})

    def sample(self, ids: np.ndarray, opts: dict):
        import torch

        from vim_core.transformer.requests import UNCONDITIONAL, sampling_options
        from vim_core.transformer.sampling import sample

        model = self.transformer
        checked = sampling_options(opts, len(ids), model.vocab_size)
        if model.num_classes == 0:  # unconditional: the ids only count the images
            return sample(model, len(ids), None, device=self.device, **{**checked, "cfg_scale": 1.0})
        if self.uncond is not None:  # checked even with no -1 in the request: a bad value is refused
            own = {k.removeprefix(UNCOND): v for k, v in opts.items() if k.startswith(UNCOND)}
            free_opts = {**sampling_options({**opts, **own}, len(ids), model.vocab_size), "cfg_scale": 1.0}
        free = torch.from_numpy(ids == UNCONDITIONAL)
        tokens = torch.empty(len(ids), model.seq_len, dtype=torch.long)
        if not free.all():
            labels = torch.from_numpy(ids)[~free]
            tokens[~free] = sample(model, len(labels), labels, device=self.device, **checked)
        if free.any():  # the unconditional copy: no class, so no guidance
            tokens[free] = sample(self.uncond, int(free.sum()), None, device=self.device, **free_opts)
        return tokens


mlflow.models.set_model(VimModel())
