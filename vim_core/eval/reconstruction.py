"""Reconstruction metrics of a tokenizer alone: rFID_domain, PSNR, SSIM and codebook usage on the test split.

Its own step (stage evaluate_tokenizer), so a study that stops at the tokenizer, such as the compute-scaling
curve of studies/tokenizer_scaling.yaml, gets rFID without training or sampling a VIM. The evaluate stage
calls the same function, so eval.json's reconstruction rows are the same numbers.
"""

import time
from collections.abc import Callable

import numpy as np
import torch

from vim_core.config import Params
from vim_core.data.shards import load_split
from vim_core.eval import fidelity
from vim_core.eval.classifier_stage import load_trained
from vim_core.eval.ssim import ssim
from vim_core.progress import phase
from vim_core.tokenizer.export import Tokenizer, load_tokenizer
from vim_core.tokenizer.metrics import codebook_usage, psnr


def reconstruction_metrics(
    tokenizer: Tokenizer, test_x: np.ndarray, dm: Callable[[np.ndarray, np.ndarray], dict]
) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """rFID, PSNR, SSIM and codebook usage on the test split, with the tokens and reconstructions.

    dm(images, reference) scores images against a reference with the domain extractor.
    """
    n_ref = len(test_x)
    phase("evaluate", "reconstruction", f"{n_ref} test images")
    test_tokens = tokenizer.encode_uint8(test_x)
    recon = tokenizer.decode_uint8(test_tokens)
    metrics = {"rfid_domain": dm(recon, test_x)["fid_domain"]}
    x01 = torch.from_numpy(test_x).float() / 255
    r01 = torch.from_numpy(recon).float() / 255
    metrics["psnr"] = round(float(psnr(r01, x01)), 3)
    metrics["ssim"] = round(ssim(recon, test_x), 4)
    metrics["codebook_usage"] = round(codebook_usage(test_tokens, tokenizer.codebook_size, 256), 4)
    definitions = {
        "images": n_ref,
        "split": "test",
        "rfid_domain": "reconstructions vs originals of the test split, domain extractor",
        "codebook_usage": "fraction of codes used per batch of 256 test images, averaged over full batches",
        "psnr": "per image on [0, 1] pixels, averaged",
        "ssim": "Gaussian window 11, sigma 1.5, averaged",
    }
    return metrics, definitions, test_tokens, recon


def evaluate_tokenizer(params: Params) -> dict:
    """tokenizer_eval.json's content: the exported tokenizer's reconstruction metrics on the test split.

    The test split only scores here: nothing is chosen from these numbers.
    """
    started = time.monotonic()
    test_x, _ = load_split(params.data.out_dir, "test")
    clf_path, _, clf_report = load_trained(params.evaluate.classifier_dir, params.data.out_dir)
    tokenizer = load_tokenizer(f"{params.tokenizer.out_dir}/tokenizer.safetensors").eval()
    definitions: dict = {}

    def dm(images: np.ndarray, reference: np.ndarray) -> dict:
        result = fidelity.domain_metrics(
            images, reference, clf_path, kid_subset_size=params.evaluate.kid_subset_size, seed=params.seed
        )
        definitions.setdefault("torch_fidelity", result.pop("definition"))
        return {k: round(v, 5) for k, v in result.items()}

    metrics, definitions["reconstruction"], _, _ = reconstruction_metrics(tokenizer, test_x, dm)
    definitions["domain_extractor"] = {
        "classifier": clf_path,
        "classifier_test_accuracy": clf_report["classifier_test_accuracy"],
    }
    return {**metrics, "definitions": definitions, "seconds": round(time.monotonic() - started, 1)}
