"""FID/KID/IS through real torch-fidelity: the domain extractor, the Inception path, and SSIM."""

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

from vim_core.errors import VimError
from vim_core.eval.classifier import save_classifier, train_classifier
from vim_core.eval.fidelity import INCEPTION_FILE, INCEPTION_SHA256, domain_metrics, inception_metrics
from vim_core.eval.ssim import ssim, ssim_per_image
from vim_core.io import find_weights, sha256_file

N = 300


@pytest.fixture(scope="module")
def classifier_path(mnist_splits, tmp_path_factory):
    """A quickly trained classifier (2 epochs on 3000 images): good enough to tell digits from noise."""
    (x, y), (xt, yt) = mnist_splits
    model, report = train_classifier(x[:3000], y[:3000], xt, yt, epochs=2, seed=0)
    assert report["test_accuracy"] > 0.9
    path = str(tmp_path_factory.mktemp("clf") / "classifier.safetensors")
    save_classifier(model, path, {"test_accuracy": report["test_accuracy"]})
    return path


def test_domain_fid_tells_real_from_noise(mnist_splits, classifier_path):
    (x, _), (xt, _) = mnist_splits
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(N, 1, 32, 32), dtype=np.uint8)
    blank = np.zeros((N, 1, 32, 32), np.uint8)

    real = domain_metrics(x[:N], xt[:N], classifier_path, kid_subset_size=100, seed=0)
    vs_noise = domain_metrics(noise, xt[:N], classifier_path, kid_subset_size=100, seed=0)
    vs_blank = domain_metrics(blank, xt[:N], classifier_path, kid_subset_size=100, seed=0)
    print({k: (real[k], vs_noise[k], vs_blank[k]) for k in ("fid_domain", "kid_domain", "isc_domain")})

    assert 0 <= real["fid_domain"] < vs_noise["fid_domain"] / 10
    assert real["fid_domain"] < vs_blank["fid_domain"] / 10
    assert (
        real["kid_domain"] < vs_noise["kid_domain"] / 10 and real["kid_domain"] < vs_blank["kid_domain"] / 10
    )
    # Ten balanced, confidently recognised classes give an IS near 10; one repeated image gives exactly 1.
    assert real["isc_domain"] > 6
    assert vs_blank["isc_domain"] == pytest.approx(1.0, abs=1e-4)
    for r in (real, vs_noise, vs_blank):
        assert all(math.isfinite(r[k]) for k in r if k != "definition")


def test_domain_metrics_record_their_definition(mnist_splits, classifier_path):
    (x, _), (xt, _) = mnist_splits
    a, b = torch.from_numpy(x[:120]), torch.from_numpy(xt[:150])
    r = domain_metrics(a, b, classifier_path, kid_subset_size=1000, seed=3)
    d = r["definition"]
    assert d["feature_extractor"] == "vim-domain"
    assert (d["images_a"], d["images_b"]) == (120, 150)
    assert d["kid_subset_size"] == 120  # capped at the smaller set
    assert d["seed"] == 3 and d["classifier_sha256"] == sha256_file(classifier_path)
    assert d["classifier_test_accuracy"] > 0.9
    assert set(r) == {
        "fid_domain",
        "kid_domain",
        "kid_domain_std",
        "isc_domain",
        "isc_domain_std",
        "definition",
    }
    # Same inputs and seed, same numbers (torch-fidelity's KID subsets and IS splits are seeded).
    again = domain_metrics(a, b, classifier_path, kid_subset_size=1000, seed=3)
    assert again["kid_domain"] == r["kid_domain"] and again["isc_domain"] == r["isc_domain"]


def test_domain_metrics_reject_wrong_inputs(mnist_splits, classifier_path, tmp_path):
    (x, _), _ = mnist_splits
    with pytest.raises(VimError, match="uint8"):
        domain_metrics(x[:10].astype(np.float32), x[:10], classifier_path)
    with pytest.raises(VimError, match="channels"):
        domain_metrics(np.repeat(x[:10], 3, axis=1), x[:10], classifier_path)
    with pytest.raises(VimError, match="not found"):
        domain_metrics(x[:10], x[:10], str(tmp_path / "none.safetensors"))


def test_reconstruction_fid_grows_with_damage(mnist_splits, classifier_path):
    """rFID = domain FID of (reconstructions, originals): worse reconstructions must score worse."""
    (_, _), (xt, _) = mnist_splits
    orig = xt[:N]
    rng = np.random.default_rng(1)

    def damage(sigma):
        return np.clip(orig + rng.normal(0, sigma, orig.shape), 0, 255).astype(np.uint8)

    fids = [
        domain_metrics(damage(s), orig, classifier_path, kid_subset_size=100)["fid_domain"]
        for s in (0, 40, 120)
    ]
    assert fids[0] == pytest.approx(0.0, abs=1e-3)
    assert fids[0] < fids[1] < fids[2]


# --- Inception path ---------------------------------------------------------------------------------------


class _InceptionShapes(tf_inception.FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 left at its random init: its constructor loads weights, so skip that."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


def _random_inception_file(folder: Path, monkeypatch) -> Path:
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
    torch.manual_seed(0)
    net = _InceptionShapes("shapes", ["2048"])
    monkeypatch.undo()
    # He init keeps activations alive through ~45 ReLU layers (PyTorch's default init lets them vanish).
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    state = net.state_dict()
    path = folder / INCEPTION_FILE
    torch.save(state, path)
    return path


def test_inception_path_runs_on_a_checked_file(mnist_splits, tmp_path, monkeypatch):
    (x, _), (xt, _) = mnist_splits
    path = _random_inception_file(tmp_path, monkeypatch)
    digest = sha256_file(path)
    settings = dict(kid_subset_size=6, kid_subsets=5, isc_splits=2, batch_size=8, expected_sha256=digest)
    r = inception_metrics(x[:8], xt[:8], str(tmp_path), **settings)  # one call: FID in 2048-d costs ~10 s
    print({k: v for k, v in r.items() if k != "definition"})
    for k in ("fid_inception", "kid_inception", "kid_inception_std", "isc_inception", "isc_inception_std"):
        assert math.isfinite(r[k]), k
    # Live activations: random filters still tell two different sets of digits apart.
    assert r["fid_inception"] > 1e-3
    assert r["isc_inception"] > 1
    d = r["definition"]
    assert d["feature_extractor"] == "inception-v3-compat" and d["weights_sha256"] == digest
    assert (d["images_a"], d["images_b"], d["kid_subset_size"], d["input_channels"]) == (8, 8, 6, 1)


def test_inception_missing_file_is_skipped_with_a_reason(mnist_splits, tmp_path):
    (x, _), _ = mnist_splits
    for weights_dir in (str(tmp_path), None):
        r = inception_metrics(x[:4], x[:4], weights_dir)
        assert r["fid_inception"] is None and r["isc_inception"] is None and r["kid_inception"] is None
        assert INCEPTION_FILE in r["skipped"] and "6726825d" in r["skipped"] and "\n" not in r["skipped"]
    assert str(tmp_path) in inception_metrics(x[:4], x[:4], str(tmp_path))["skipped"]


class _TouchOnUnpickle:
    """Unpickling this touches a file: evidence of whether anyone unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (self.marker.touch, ())


def test_inception_checksum_mismatch_is_refused_unopened(mnist_splits, tmp_path):
    (x, _), _ = mnist_splits
    marker = tmp_path / "unpickled"
    torch.save(_TouchOnUnpickle(marker), tmp_path / INCEPTION_FILE)
    with pytest.raises(VimError) as err:
        inception_metrics(x[:4], x[:4], str(tmp_path))
    assert "\n" not in str(err.value) and "refusing" in str(err.value) and "6726825d" in str(err.value)
    assert not marker.exists()
    # The payload is live: loading it the way torch-fidelity does touches the marker.
    torch.load(tmp_path / INCEPTION_FILE, weights_only=False)
    assert marker.exists()


@pytest.mark.security
def test_inception_prefix_match_is_not_enough(mnist_splits, tmp_path):
    """A file whose sha256 shares the expected 8-digit prefix but not the rest is refused unopened."""
    (x, _), _ = mnist_splits
    marker = tmp_path / "unpickled"
    torch.save(_TouchOnUnpickle(marker), tmp_path / INCEPTION_FILE)
    digest = sha256_file(tmp_path / INCEPTION_FILE)
    twin = digest[:8] + ("0" if digest[8] != "0" else "1") + digest[9:]  # same 32-bit prefix, another file
    with pytest.raises(VimError) as err:
        inception_metrics(x[:4], x[:4], str(tmp_path), expected_sha256=twin)
    assert "refusing" in str(err.value) and twin in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()
    # A prefix can no longer be passed for a file that is unpickled.
    with pytest.raises(ValueError, match="whole sha256"):
        find_weights(str(tmp_path), INCEPTION_FILE, digest[:8], "test", unpickled=True)
    assert len(INCEPTION_SHA256) == 64 and INCEPTION_SHA256.startswith("6726825d")


def _torch_load_calls(root: Path):
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                yield path, node


@pytest.mark.security
def test_no_unpickling_load_without_a_whole_hash():
    """Every torch.load in vim_core and flows passes weights_only=True; the one file that is unpickled
    (torch-fidelity's Inception) goes through find_weights(..., unpickled=True) with a 64-digit sha256."""
    repo = Path(__file__).resolve().parents[3]
    calls = [c for top in ("vim_core", "flows") for c in _torch_load_calls(repo / top)]
    assert calls, "the scan found no torch.load at all: it is broken"
    for path, node in calls:
        flags = {k.arg: k.value for k in node.keywords}
        safe = isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True
        assert safe, f"{path.relative_to(repo)}:{node.lineno}: torch.load without weights_only=True"
    # Whoever hands a file to torch-fidelity (which unpickles it) must check its whole hash first.
    for path in sorted((repo / "vim_core").rglob("*.py")) + sorted((repo / "flows").rglob("*.py")):
        tree = ast.parse(path.read_text())
        if "feature_extractor_weights_path" not in path.read_text():
            continue
        finds = [
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.Call)
            and ast.unparse(n.func) == "find_weights"
            and any(k.arg == "unpickled" and getattr(k.value, "value", None) is True for k in n.keywords)
        ]
        assert finds, f"{path.relative_to(repo)} hands weights to torch-fidelity without a whole-hash check"


# --- SSIM -------------------------------------------------------------------------------------------------


def _naive_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Straight from the formula, one window position at a time (one channel)."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i : i + 11, j : j + 11].astype(float), y[i : i + 11, j : j + 11].astype(float)
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cov = (w * (a - ma) * (b - mb)).sum()
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_the_formula_and_known_values(mnist_splits):
    (_, _), (xt, _) = mnist_splits
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(2, 1, 14, 13), dtype=np.uint8)
    y = np.clip(x + rng.normal(0, 30, x.shape), 0, 255).astype(np.uint8)
    per = ssim_per_image(x, y)
    assert per[0].item() == pytest.approx(_naive_ssim(x[0, 0], y[0, 0]), rel=1e-9)
    assert per[1].item() == pytest.approx(_naive_ssim(x[1, 0], y[1, 0]), rel=1e-9)

    assert ssim(xt[:50], xt[:50]) == pytest.approx(1.0, abs=1e-12)
    noisy = [np.clip(xt[:50] + rng.normal(0, s, xt[:50].shape), 0, 255).astype(np.uint8) for s in (10, 60)]
    assert 1.0 > ssim(xt[:50], noisy[0]) > ssim(xt[:50], noisy[1]) > 0
    # Flat black vs flat white: only the luminance term is left, C1 / (255^2 + C1).
    black, white = np.zeros((1, 3, 16, 16), np.uint8), np.full((1, 3, 16, 16), 255, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert ssim(black, white) == pytest.approx(c1 / (255**2 + c1), rel=1e-9)
    assert ssim(x, y) == pytest.approx(ssim(y, x), rel=1e-12)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[..., :8, :8], y[..., :8, :8])
