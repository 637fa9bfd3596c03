"""Bad requests to the served generator: each is refused before any work with one line, never a 500.

The same table of cases runs twice: in-process through the logged pyfunc (an MlflowException with
INVALID_PARAMETER_VALUE), and over HTTP against a real `mlflow models serve` (status 400, the reason on
the message's last line). The HTTP half is slow (one server start); it runs in CI's slow step.
Clamped values (top_k above the codebook, batch_size above the images) are answered normally.
"""

import json
import math
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests import servers
from tests.flows.test_orchestration_models import logged, micro, one_thread, store  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[2]
NAN, INF = float("nan"), float("inf")

# name: (inputs, params, what the one-line refusal says). Inputs go to predict() as they are, and over
# HTTP as {"inputs": ...} (with "params" when given).
MLFLOW_PARAMS = "Invalid parameters found"  # MLflow's own check of the signature's param types (also 400)
CASES = {
    "req_batch_size_negative": ([1, 2], {"batch_size": -1}, "batch_size must be >= 1, got -1"),
    "req_batch_size_zero": ([1, 2], {"batch_size": 0}, "batch_size must be >= 1, got 0"),
    "req_batch_size_null": ([1, 2], {"batch_size": None}, "batch_size must be a number, got None"),
    "req_temperature_nan": ([1], {"temperature": NAN}, "temperature must be finite"),
    "req_temperature_inf": ([1], {"temperature": INF}, "temperature must be finite"),
    "req_temperature_negative": ([1], {"temperature": -1.0}, "temperature must be in 0..100"),
    "req_temperature_absurd": ([1], {"temperature": 1e300}, "temperature must be in 0..100"),
    "req_temperature_text": ([1], {"temperature": "hot"}, MLFLOW_PARAMS),
    "req_cfg_scale_nan": ([1], {"cfg_scale": NAN}, "cfg_scale must be finite"),
    "req_cfg_scale_inf": ([1], {"cfg_scale": -INF}, "cfg_scale must be finite"),
    "req_cfg_scale_negative": ([1], {"cfg_scale": -2.0}, "cfg_scale must be in 0..100"),
    "req_top_k_negative": ([1], {"top_k": -5}, "top_k must be >= 0 (0 is off), got -5"),
    "req_top_k_fraction": ([1], {"top_k": 2.5}, MLFLOW_PARAMS),
    "req_top_p_zero": ([1], {"top_p": 0.0}, "top_p must be in (0, 1] (1 is off), got 0"),
    "req_top_p_above_one": ([1], {"top_p": 1.5}, "top_p must be in (0, 1] (1 is off), got 1.5"),
    "req_top_p_nan": ([1], {"top_p": NAN}, "top_p must be finite"),
    "req_seed_negative": ([1], {"seed": -1}, "seed must be in 0..9.22337e+18, got -1"),
    "req_seed_null": ([1], {"seed": None}, "seed must be a number, got None"),
    "req_seed_list": ([1], {"seed": [1, 2]}, MLFLOW_PARAMS),
    "req_empty_list": ([], None, "Model inference is missing inputs"),  # MLflow's schema check
    # the micro generator has an unconditional copy: -1 asks it for an image, -2 is nothing
    "req_class_id_out_of_range": (
        [3, 10],
        None,
        "class ids must be in -1..9 (-1: an unconditional image), got [10]",
    ),
    "req_class_id_negative": (
        [-2],
        None,
        "class ids must be in -1..9 (-1: an unconditional image), got [-2]",
    ),
    # MLflow's schema check answers these first: in-process "Can not safely convert float64 to int64",
    # over HTTP its parser's "Python int too large to convert to C long".
    "req_class_id_absurd": ([1e30], None, ("Can not safely convert float64", "Python int too large")),
    "req_class_id_text": (["seven"], None, "seven"),  # MLflow's own parse refuses it (in-process: its schema)
    "req_class_id_huge_int": (
        [2**40],
        None,
        "class ids must be in -1..9 (-1: an unconditional image), got [1099511627776]",
    ),
    "req_too_many_images": (list(range(10)) * 30, None, "300 class ids in one request; at most 256"),
}
# Only in-process: forms that JSON cannot carry as such.
IN_PROCESS = {
    "req_dict_without_class_id": ({"label": [1]}, None, "expected a class_id column, got ['label']"),
    "req_dataframe_two_columns": (pd.DataFrame({"a": [1], "b": [2]}), None, "expected a class_id column"),
    "req_empty_dataframe": (pd.DataFrame({"class_id": []}), None, "Incompatible input types"),
    "req_none_class_id": ([None], None, "Can not safely convert object to int64"),
    # Over HTTP, MLflow's server casts 1.5 to 1 for the signature's long column before the model sees it
    # (a limitation of its parser, see docs/reliability.md); in-process its schema check refuses the fraction.
    "req_class_id_fraction": ([1.5], None, "Can not safely convert float64 to int64"),
    "req_bool_temperature": ([1], {"temperature": True}, MLFLOW_PARAMS),
}
# vim_core's own check, for forms MLflow's schema reshapes before the model sees them.
DIRECT = {
    "ids_text": ("seven", "class ids must be integers, got text 'seven'"),
    "ids_nested_ragged": ([[1, 2], [3]], "flat list of integers, got nested lists"),
    "ids_nested_grid": ([[1, 2], [3, 4]], "flat list of integers, got shape (2, 2)"),
    "ids_null": ([None], "class ids must be integers, got null"),
    "ids_empty": ([], "the request holds no class ids"),
    "ids_fraction": ([1.5], "class id must be an integer, got 1.5"),
    "ids_absurd": ([1e30], "class ids must be in 0..9"),
    "ids_nan": ([NAN], "class id must be finite"),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", list(DIRECT))
def test_bad_class_ids_direct(case):
    from vim_core.transformer.requests import BadRequest, class_ids

    values, says = DIRECT[case]
    with pytest.raises(BadRequest) as err:
        class_ids(values, num_classes=10, cap=256)
    assert "\n" not in str(err.value) and says in str(err.value), str(err.value)


def _alternatives(says: str | tuple[str, ...]) -> tuple[str, ...]:
    return says if isinstance(says, tuple) else (says,)


def _refused_in_process(gen, inputs, params, says):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as err:
        gen.predict(inputs, params=params)
    assert err.value.error_code == "INVALID_PARAMETER_VALUE", err.value
    assert any(s in err.value.message for s in _alternatives(says)), err.value.message
    if not err.value.message.startswith(("Failed to enforce schema", MLFLOW_PARAMS)):  # ours: one line
        assert "\n" not in err.value.message, err.value.message


@pytest.fixture(scope="module")
def generator(logged):  # noqa: F811
    import mlflow

    return mlflow.pyfunc.load_model(logged)


@pytest.mark.bad_input
@pytest.mark.parametrize("case", list(CASES) + list(IN_PROCESS))
def test_bad_request_in_process(case, generator):
    inputs, params, says = {**CASES, **IN_PROCESS}[case]
    _refused_in_process(generator, inputs, params, says)


def test_clamped_options_are_served(generator):
    """top_k above the codebook keeps every token, batch_size above the images draws the same images."""
    plain = generator.predict([4, 0], params={"top_k": 0, "batch_size": 2})
    clamped = generator.predict([4, 0], params={"top_k": 10**9, "batch_size": 10**9})
    assert list(clamped.image_png) == list(plain.image_png)
    greedy = generator.predict([4], params={"temperature": 0.0})  # 0 is greedy, not refused
    assert len(greedy) == 1


def _post(url: str, body: dict) -> tuple[int, dict]:
    # allow_nan: NaN and Infinity travel as JSON's common extension, which MLflow's parser accepts.
    data = json.dumps(body, allow_nan=True).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.fixture(scope="module")
def served(logged, tmp_path_factory):  # noqa: F811
    """One real `mlflow models serve` of the generator for every HTTP case of this module."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with servers.model_server(logged, log) as url:
        yield f"{url}/invocations"


@pytest.mark.slow
@pytest.mark.bad_input
@pytest.mark.parametrize("case", [f"http_{c}" for c in CASES])
def test_bad_request_over_http(case, served):
    inputs, params, says = CASES[case.removeprefix("http_")]
    body = {"inputs": inputs, **({"params": params} if params else {})}
    status, answer = _post(served, body)
    assert status == 400, (status, answer)
    # MLflow puts "Failed to predict data ..." on the line above ours; ours is one line.
    assert any(s in answer["message"].splitlines()[-1] for s in _alternatives(says)), answer


@pytest.mark.slow
def test_good_request_over_http_after_bad_ones(served):
    """The server is still healthy after every refusal, and a clamped request is served, an unconditional
    image (-1) included."""
    status, answer = _post(served, {"inputs": [1, -1], "params": {"top_k": 10**9, "batch_size": 10**9}})
    assert status == 200 and len(answer["predictions"]) == 2, answer
    assert all(isinstance(row["image_png"], str) for row in answer["predictions"])
    assert not math.isnan(float(answer["predictions"][0]["class_id"]))
    np.testing.assert_array_equal([row["class_id"] for row in answer["predictions"]], [1, -1])
