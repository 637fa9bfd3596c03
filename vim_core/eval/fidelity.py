"""FID / KID / IS through torch-fidelity, with two feature extractors (DESIGN.md section 2):

- "vim-domain": the DomainClassifier trained on the dataset's labels; always available, so the embedded
  default never needs downloaded weights;
- "inception-v3-compat": torch-fidelity's InceptionV3, only when its weights file is under weights_dir and
  its whole sha256 matches, since torch-fidelity unpickles that file.

Each result carries a `definition` dict: what was measured, on how many images, with which settings.
"""

import hashlib

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from vim_core.errors import VimError
from vim_core.eval.classifier import load_classifier
from vim_core.io import find_weights, url_fs
from vim_core.tokenizer.model import to_model_range

DOMAIN_EXTRACTOR = "vim-domain"
INCEPTION_EXTRACTOR = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
# The whole sha256 of torch-fidelity's v0.2.0 release asset INCEPTION_URL (95,628,359 bytes). The file
# cannot be downloaded here: this is the digest that several public projects pin for that exact URL (and
# for pytorch-fid's pt_inception-2015-12-05-6726825d.pth), found by searching public code, not measured.
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_SHA256_PREFIX = INCEPTION_SHA256[:8]  # the part torch-fidelity puts in the file name
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


class DomainFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity extractor around a saved DomainClassifier, whose path arrives through torch-fidelity's
    `feature_extractor_weights_path` (a safetensors file, so nothing is unpickled).

    Features: "feat" (the classifier's hidden layer, for FID/KID/PRC), "logits" (for IS: the classifier's
    own p(y|x)), and "logits_unbiased" (without the head's bias, named as in torch-fidelity's Inception).
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise VimError(
                f"feature extractor {name} needs the domain classifier file (feature_extractor_weights_path)"
            )
        self.classifier, _ = load_classifier(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x):
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4):
            raise ValueError(f"expecting uint8 images (N, C, H, W), got {getattr(x, 'dtype', type(x))}")
        feat = self.classifier.features(to_model_range(x))
        head = self.classifier.head
        unbiased = feat @ head.weight.T
        out = {"feat": feat, "logits_unbiased": unbiased, "logits": unbiased + head.bias}
        return tuple(out[name].float() for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "feat", "logits_unbiased", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "feat", "kid": "feat", "prc": "feat"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 32, 32, dtype=torch.uint8)


def register_domain_extractor() -> None:
    """Make "vim-domain" known to torch-fidelity (idempotent: its registry refuses duplicates)."""
    if DOMAIN_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(DOMAIN_EXTRACTOR, DomainFeatureExtractor)


class UInt8Images(Dataset):
    """uint8 (N, C, H, W) images as a Dataset of CHW tensors, the input torch-fidelity takes in memory."""

    def __init__(self, images, channels: int | None = None):
        t = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
        if t.dtype != torch.uint8 or t.ndim != 4:
            raise VimError(f"metrics need uint8 images (N, C, H, W), got {t.dtype} {tuple(t.shape)}")
        if len(t) == 0:
            raise VimError("metrics need at least one image")
        if channels is not None and t.shape[1] != channels:
            if t.shape[1] != 1:
                raise VimError(f"images have {t.shape[1]} channels, the feature extractor wants {channels}")
            t = t.expand(-1, channels, -1, -1)  # grayscale seen by an RGB network: the same plane thrice
        self.images = t

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i].contiguous()


def _sha256_url(url: str) -> str:
    fs, path = url_fs(url)
    with fs.open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _use_cuda(device) -> bool:
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def _calculate(
    a: UInt8Images,
    b: UInt8Images,
    extractor: str,
    weights_path: str,
    kid_subset_size: int,
    kid_subsets: int,
    isc_splits: int,
    seed: int,
    batch_size: int,
    device,
) -> tuple[dict, dict]:
    """torch-fidelity's FID and KID (a vs b) and IS (on a): (its raw result, the settings actually used)."""
    used = dict(
        # Capped so that small sets still work; the definition records the values used.
        kid_subset_size=min(kid_subset_size, len(a), len(b)),
        kid_subsets=kid_subsets,
        isc_splits=min(isc_splits, len(a)),
        seed=seed,
    )
    raw = torch_fidelity.calculate_metrics(
        input1=a,
        input2=b,
        fid=True,
        kid=True,
        isc=True,
        feature_extractor=extractor,
        feature_extractor_weights_path=weights_path,
        rng_seed=seed,
        kid_subset_size=used["kid_subset_size"],
        kid_subsets=kid_subsets,
        isc_splits=used["isc_splits"],
        batch_size=batch_size,
        cuda=_use_cuda(device),
        save_cpu_ram=True,  # no DataLoader worker processes: the images are already in memory
        cache=False,
        verbose=False,
    )
    return raw, used


def _result(raw: dict, suffix: str, definition: dict) -> dict:
    return {
        f"fid_{suffix}": float(raw["frechet_inception_distance"]),
        f"kid_{suffix}": float(raw["kernel_inception_distance_mean"]),
        f"kid_{suffix}_std": float(raw["kernel_inception_distance_std"]),
        f"isc_{suffix}": float(raw["inception_score_mean"]),
        f"isc_{suffix}_std": float(raw["inception_score_std"]),
        "definition": definition,
    }


def _definition(extractor: str, layers: dict, a, b, used: dict, **more) -> dict:
    return {
        "feature_extractor": extractor,
        "feature_layers": layers,
        "images_a": len(a),
        "images_b": len(b),
        "fid_kid": "images_a vs images_b",
        "isc": "images_a",
        "kid_subset_size": used["kid_subset_size"],
        "kid_subsets": used["kid_subsets"],
        "isc_splits": used["isc_splits"],
        "seed": used["seed"],
        "torch_fidelity": torch_fidelity.__version__,
        **more,
    }


def domain_metrics(
    images_a,
    images_b,
    classifier_path: str,
    kid_subset_size: int = 1000,
    seed: int = 2020,
    kid_subsets: int = 100,
    isc_splits: int = 10,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> dict:
    """FID/KID of images_a vs images_b and IS of images_a in the domain classifier's feature space.

    For rFID pass (reconstructions, originals); for sample FID pass (samples, held-out images).
    kid_subset_size is capped at the smaller set; `definition` records the size actually used.
    """
    register_domain_extractor()
    classifier, extra = load_classifier(classifier_path)  # fail early, with one line, on a bad file
    channels = classifier.spec["channels"]
    a, b = UInt8Images(images_a, channels), UInt8Images(images_b, channels)
    raw, used = _calculate(
        a,
        b,
        DOMAIN_EXTRACTOR,
        classifier_path,
        kid_subset_size,
        kid_subsets,
        isc_splits,
        seed,
        batch_size,
        device,
    )
    definition = _definition(
        DOMAIN_EXTRACTOR,
        {"fid": "feat", "kid": "feat", "isc": "logits"},
        a,
        b,
        used,
        classifier_sha256=_sha256_url(classifier_path),
        classifier_test_accuracy=extra.get("test_accuracy"),
    )
    return _result(raw, "domain", definition)


def inception_skip_reason(weights_dir: str | None, filename: str = INCEPTION_FILE) -> str | None:
    """None when the Inception weights file is under weights_dir, else one line saying what to put where."""
    if weights_dir:
        fs, path = url_fs(f"{weights_dir.rstrip('/')}/{filename}")
        if fs.exists(path):
            return None
    where = weights_dir or "weights_dir (not set)"
    return (
        f"Inception metrics skipped: {filename} (sha256 starts with {INCEPTION_SHA256_PREFIX}) is not in "
        f"{where}; download {INCEPTION_URL} on a machine with internet and put it there"
    )


def inception_metrics(
    images_a,
    images_b,
    weights_dir: str | None,
    kid_subset_size: int = 1000,
    seed: int = 2020,
    kid_subsets: int = 100,
    isc_splits: int = 10,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    expected_sha256: str = INCEPTION_SHA256,
) -> dict:
    """Inception FID/KID/IS when its weights are under weights_dir; otherwise None values and `skipped`.

    A file whose whole sha256 is not expected_sha256 is refused (VimError) before torch-fidelity unpickles
    it; a prefix match is not enough. Grayscale images are repeated to 3 channels; the network resizes to 299 itself.
    """
    reason = inception_skip_reason(weights_dir)
    if reason is not None:
        return {"fid_inception": None, "isc_inception": None, "kid_inception": None, "skipped": reason}
    local = find_weights(weights_dir, INCEPTION_FILE, expected_sha256, "Inception FID/IS/KID", unpickled=True)
    channels_in = UInt8Images(images_a).images.shape[1]  # 1: grayscale, repeated to RGB below
    a, b = UInt8Images(images_a, 3), UInt8Images(images_b, 3)
    raw, used = _calculate(
        a, b, INCEPTION_EXTRACTOR, local, kid_subset_size, kid_subsets, isc_splits, seed, batch_size, device
    )
    definition = _definition(
        INCEPTION_EXTRACTOR,
        {"fid": "2048", "kid": "2048", "isc": "logits_unbiased"},
        a,
        b,
        used,
        input_channels=channels_in,
        weights_file=INCEPTION_FILE,
        weights_sha256_prefix=expected_sha256[:8],
        weights_sha256=expected_sha256,
    )
    return _result(raw, "inception", definition)
