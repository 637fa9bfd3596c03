"""Exports are byte-deterministic: equal weights and spec give an equal file (vim_core.io).

safetensors orders `__metadata__` at random per call; DVC hashes the exported file, so without
canonical_safetensors a resume that trains bit-identical weights still reruns every stage below it
(found by tests/faults/test_stage_kills.py).
"""

import torch
from safetensors.torch import load_file

from vim_core.io import load_safetensors_with_spec, save_safetensors_with_spec


def test_equal_weights_export_equal_bytes(tmp_path):
    state = {"w": torch.randn(4, 3), "b": torch.zeros(3), "idx": torch.arange(5)}
    spec = {"model": {"dim": 32, "name": "é"}, "image_size": 32}
    files = set()
    for i in range(20):  # without the fix: several orders of the 2 metadata keys
        path = tmp_path / f"{i}.safetensors"
        save_safetensors_with_spec(state, spec, "vim-test/1", str(path))
        files.add(path.read_bytes())
    assert len(files) == 1
    loaded = load_file(str(path))
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    got, got_spec = load_safetensors_with_spec(str(path), "vim-test/1", "test")
    assert got_spec == spec and torch.equal(got["w"], state["w"])
