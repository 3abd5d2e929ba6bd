"""Open Inference Protocol (KServe v2): metadata, health, JSON and binary inference, errors; tritonclient."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import numpy.typing as npt
import orjson
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient
from pydantic import SecretStr
from tritonclient.utils import InferenceServerException

from service.api.bodies import quoted
from service.config import Settings
from service.main import create_app
from service.model_card import ModelCard
from service.schemas import EncodeResponse, SampleResponse
from tests.service.helpers import decoded_png, digit_png, files
from tests.service.test_main import service_env, stop, uvicorn, wait_ready

# Both paths run the same float32 graphs on the same float32 inputs; 1e-6 leaves room only for rendering
# the numbers as JSON text and back.
TOLERANCE = 1e-6
HEADER_LENGTH = "Inference-Header-Content-Length"


def digit_tensor(indices: range) -> npt.NDArray[np.float32]:
    """Digits as the service reads their PNGs: (N, 1, 8, 8) float32 in [0, 1]."""
    pixels = [decoded_png(digit_png(i)).astype(np.float32) / np.float32(255.0) for i in indices]
    return np.stack(pixels)[:, None, :, :]


def tensor(name: str, array: npt.NDArray[np.float32]) -> dict[str, Any]:
    return {"name": name, "shape": list(array.shape), "datatype": "FP32", "data": array.ravel().tolist()}


def outputs(response: httpx2.Response) -> dict[str, npt.NDArray[np.float32]]:
    """The JSON outputs of a 200 infer response, as arrays of their declared shapes."""
    assert response.status_code == 200, response.text
    return {
        output["name"]: np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
        for output in response.json()["outputs"]
    }


def error(response: httpx2.Response, status: int) -> str:
    """The protocol's error message, after checking the status and that the body is exactly {"error"}."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    message: str = body["error"]
    return message


def test_server_metadata_and_health(client: TestClient) -> None:
    metadata = client.get("/v2").json()
    assert metadata["name"] == "vae-service"
    assert metadata["extensions"] == ["binary_tensor_data"]
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2/models/decoder/ready").json() == {"name": "decoder", "ready": True}


def test_before_the_model_is_loaded_only_liveness_answers(settings: Settings) -> None:
    client = TestClient(create_app(settings))  # not entered: the lifespan has not run
    assert client.get("/v2/health/live").status_code == 200
    assert error(client.get("/v2/health/ready"), 503) == "the model is not loaded yet"
    assert error(client.get("/v2/models/encoder/ready"), 503) == "the model is not loaded yet"


def test_model_metadata_follows_the_card(client: TestClient, card: ModelCard) -> None:
    c, h, w = card.input_shape
    d = card.latent_dim
    assert client.get("/v2/models/encoder").json() == {
        "name": "encoder",
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, c, h, w]}],
        "outputs": [
            {"name": "mu", "datatype": "FP32", "shape": [-1, d]},
            {"name": "logvar", "datatype": "FP32", "shape": [-1, d]},
        ],
    }
    decoder = client.get("/v2/models/decoder").json()
    assert decoder["inputs"] == [{"name": "z", "datatype": "FP32", "shape": [-1, d]}]
    assert decoder["outputs"] == [
        {"name": "x_mean", "datatype": "FP32", "shape": [-1, c, h, w]},
        {"name": "logits", "datatype": "FP32", "shape": [-1, c, h, w]},
    ]


@pytest.mark.parametrize("path", ["/v2/models/vae", "/v2/models/vae/ready"], ids=["metadata", "ready"])
def test_an_unknown_model_is_a_404(client: TestClient, path: str) -> None:
    assert error(client.get(path), 404) == "model 'vae' is not served here; the models: encoder, decoder"


@pytest.mark.parametrize(
    "method, path, unversioned",
    [
        ("GET", "/v2/models/decoder/versions/1", "/v2/models/decoder"),
        ("GET", "/v2/models/encoder/versions/1/ready", "/v2/models/encoder/ready"),
        ("POST", "/v2/models/decoder/versions/1/infer", "/v2/models/decoder/infer"),
    ],
    ids=["metadata", "ready", "infer"],
)
def test_versioned_paths_are_a_404_naming_the_unversioned_one(
    client: TestClient, method: str, path: str, unversioned: str
) -> None:
    response = client.request(method, path, json={"inputs": [Z]} if method == "POST" else None)
    assert error(response, 404) == f"model versions are not served; use {unversioned}"
    assert error(client.post("/v2/models/vae/versions/1/infer"), 404).startswith("model 'vae' is not served")


def test_json_encoder_matches_encode(client: TestClient) -> None:
    x = digit_tensor(range(3))
    response = client.post("/v2/models/encoder/infer", json={"id": "abc", "inputs": [tensor("x", x)]})
    assert response.json()["id"] == "abc"
    got = outputs(response)
    encoded = EncodeResponse.model_validate_json(
        client.post("/encode", files=files(*(digit_png(i) for i in range(3)))).content
    )
    np.testing.assert_allclose(got["mu"], encoded.mu, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(got["logvar"], encoded.logvar, rtol=0, atol=TOLERANCE)


def test_json_decoder_matches_decode_with_flat_or_nested_data(client: TestClient) -> None:
    z = np.asarray(SampleResponse.model_validate_json(client.get("/sample?n=3&seed=4").content).latents)
    z = z.astype(np.float32)
    decoded = client.post("/decode?format=array", json={"latents": z.tolist()}).json()["images"]
    flat = outputs(client.post("/v2/models/decoder/infer", json={"inputs": [tensor("z", z)]}))
    nested = {**tensor("z", z), "data": z.tolist()}
    assert flat["x_mean"].shape == np.shape(decoded)
    np.testing.assert_allclose(flat["x_mean"], decoded, rtol=0, atol=TOLERANCE)
    np.testing.assert_array_equal(
        outputs(client.post("/v2/models/decoder/infer", json={"inputs": [nested]}))["x_mean"], flat["x_mean"]
    )


def binary_request(header: dict[str, Any], *arrays: npt.NDArray[np.float32]) -> dict[str, Any]:
    """httpx arguments for a body of JSON `header` followed by the arrays as little-endian float32."""
    json_part = orjson.dumps(header)
    return {
        "content": json_part + b"".join(array.astype("<f4").tobytes() for array in arrays),
        "headers": {HEADER_LENGTH: str(len(json_part)), "content-type": "application/octet-stream"},
    }


def test_binary_tensors_in_and_out(client: TestClient) -> None:
    x = digit_tensor(range(2))
    header = {
        "inputs": [
            {"name": "x", "shape": [2, 1, 8, 8], "datatype": "FP32", "parameters": {"binary_data_size": 512}}
        ],
        "outputs": [{"name": "logvar", "parameters": {"binary_data": True}}, {"name": "mu"}],
    }
    response = client.post("/v2/models/encoder/infer", **binary_request(header, x))
    assert response.status_code == 200, response.text
    length = int(response.headers[HEADER_LENGTH])
    head = orjson.loads(response.content[:length])
    logvar_entry, mu_entry = head["outputs"]
    assert logvar_entry == {
        "name": "logvar",
        "datatype": "FP32",
        "shape": [2, 16],
        "parameters": {"binary_data_size": 2 * 16 * 4},
    }
    logvar = np.frombuffer(response.content[length:], dtype="<f4").reshape(2, 16)
    expected = outputs(client.post("/v2/models/encoder/infer", json={"inputs": [tensor("x", x)]}))
    np.testing.assert_array_equal(logvar, expected["logvar"])
    np.testing.assert_array_equal(
        np.asarray(mu_entry["data"], dtype=np.float32).reshape(2, 16), expected["mu"]
    )


def test_binary_data_output_asks_for_every_output_as_bytes(client: TestClient) -> None:
    z = np.zeros((1, 16), dtype=np.float32)
    body = {"parameters": {"binary_data_output": True}, "inputs": [tensor("z", z)]}
    response = client.post("/v2/models/decoder/infer", json=body)
    assert response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers[HEADER_LENGTH])
    entries = orjson.loads(response.content[:length])["outputs"]
    assert [entry["name"] for entry in entries] == ["x_mean", "logits"]
    for entry in entries:
        assert entry["parameters"] == {"binary_data_size": 64 * 4} and "data" not in entry
    assert len(response.content) == length + 2 * 64 * 4
    x_mean, logits = np.frombuffer(response.content[length:], dtype=np.float32).reshape(2, 64)
    np.testing.assert_allclose(x_mean, 1 / (1 + np.exp(-logits)), rtol=0, atol=1e-6)


Z = {"name": "z", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"inputs": [{**Z, "name": "x"}]}, 422, "inputs are 'x'; model decoder takes one input, 'z'"),
        ({"inputs": [Z, Z]}, 422, "inputs are 'z', 'z'; model decoder takes one input, 'z'"),
        ({"inputs": [{**Z, "datatype": "FP64"}]}, 422, "inputs[0].datatype is 'FP64'; decoder's z is FP32"),
        ({"inputs": [{**Z, "shape": [1, 15]}]}, 422, "inputs[0].shape is [1, 15]; decoder's z is [-1, 16]"),
        ({"inputs": [{**Z, "shape": [16]}]}, 422, "inputs[0].shape is [16]; decoder's z is [-1, 16]"),
        ({"inputs": [{**Z, "shape": [0, 16]}]}, 422, "inputs[0].shape has a batch of 0"),
        (
            {"inputs": [{**Z, "shape": [True, 16]}]},
            422,
            "inputs[0].shape is [true, 16]; it must be a list of non-negative integers",
        ),
        (
            {"inputs": [{**Z, "shape": [1, 16.0]}]},
            422,
            "inputs[0].shape is [1, 16.0]; it must be a list of non-negative integers",
        ),
        (
            {"inputs": [{**Z, "shape": [-1, 16]}]},
            422,
            "inputs[0].shape is [-1, 16]; it must be a list of non-negative integers",
        ),
        (
            {"inputs": [{**Z, "data": [0.0] * 15}]},
            422,
            "inputs[0].data has 15 values; shape [1, 16] takes 16",
        ),
        ({"inputs": [{**Z, "data": ["0.5"] * 16}]}, 422, "inputs[0].data holds something other than numbers"),
        ({"inputs": [{**Z, "data": [True] * 16}]}, 422, "inputs[0].data holds something other than numbers"),
        (
            {"inputs": [{**Z, "data": [True] + [0.0] * 15}]},
            422,
            "inputs[0].data holds something other than numbers (true); FP32 data is JSON numbers",
        ),
        (
            {"inputs": [{**Z, "data": [True] * 15 + [0]}]},
            422,
            "inputs[0].data holds something other than numbers",
        ),
        (
            {"inputs": [{**Z, "data": [[0.0] * 8, [False] + [0.0] * 7]}]},
            422,
            "inputs[0].data holds something other than numbers (false)",
        ),
        ({"inputs": [{**Z, "data": [None] + [0.0] * 15}]}, 422, "other than numbers (null)"),
        ({"inputs": [{**Z, "data": [[0.0] * 8, [0.0] * 9]}]}, 422, "inputs[0].data is ragged"),
        ({"inputs": [{**Z, "data": [1e7] * 16}]}, 422, "inputs[0].data holds values beyond ±1e+06"),
        ({"inputs": [{**Z, "data": [10**400] + [0] * 15}]}, 422, "inputs[0].data holds values beyond ±1e+06"),
        (
            {"inputs": [Z], "outputs": [{"name": "mu"}]},
            422,
            "outputs[0].name is 'mu'; decoder outputs are x_mean, logits",
        ),
        (
            {"inputs": [Z], "outputs": []},
            422,
            "outputs is empty; leave it out for every output, or name those wanted: x_mean, logits",
        ),
        (
            {"inputs": [Z], "outputs": [{"name": "x_mean", "parameters": {"shared_memory_region": "r"}}]},
            422,
            "outputs[0].parameters.shared_memory_region: shared memory is not supported",
        ),
        (
            {"inputs": [{**Z, "data": None}]},
            400,
            "inputs[0] has neither data nor parameters.binary_data_size",
        ),
        ({"inputs": []}, 400, "inputs: List should have at least 1 item"),
        ({"input": [Z]}, 400, "inputs: Field required; input: Extra inputs are not permitted"),
        ({"inputs": [Z], "parameters": {"binary_data_output": "yes"}}, 400, "binary_data_output is 'yes'"),
        (
            {"inputs": [Z], "parameters": {"binary_data_outptu": True}},
            400,
            "request.parameters has 'binary_data_outptu', which is not a parameter of the binary tensor data "
            "extension here; request takes binary_data_output",
        ),
        (
            {"inputs": [{**Z, "parameters": {"binary_data": True}}]},
            400,
            "inputs[0].parameters has 'binary_data', which is not a parameter of the binary tensor data "
            "extension here; inputs[0] takes binary_data_size",
        ),
        (
            {"inputs": [Z], "outputs": [{"name": "x_mean", "parameters": {"binary": True}}]},
            400,
            "outputs[0].parameters has 'binary', which is not a parameter of the binary tensor data "
            "extension here; outputs[0] takes binary_data",
        ),
    ],
    ids=[
        "input-name",
        "two-inputs",
        "datatype",
        "shape",
        "rank",
        "empty-batch",
        "boolean-dim",
        "float-dim",
        "negative-dim",
        "count",
        "strings",
        "booleans",
        "boolean-among-floats",
        "booleans-among-ints",
        "nested-boolean",
        "null",
        "ragged",
        "too-large",
        "integer-past-float64",
        "output-name",
        "outputs-empty",
        "shared-memory",
        "no-data",
        "no-inputs",
        "misspelt-field",
        "non-boolean-flag",
        "misspelt-request-parameter",
        "misplaced-input-parameter",
        "misspelt-output-parameter",
    ],
)
def test_bad_requests_are_named(client: TestClient, body: dict[str, Any], status: int, message: str) -> None:
    assert message in error(client.post("/v2/models/decoder/infer", json=body), status)


def test_a_key_given_twice_is_refused_not_half_read(client: TestClient) -> None:
    """A parser keeps the last of a repeated key: the first data, or a parameter, would go unread."""
    z = orjson.dumps(Z)
    cases = {
        b'{"inputs": [' + z[:-1] + b', "data": ' + orjson.dumps([1.0] * 16) + b"}]}": "data",
        b'{"inputs": ['
        + z
        + b'], "parameters": {"binary_data_output": true, "binary_data_output": false}}': (
            "binary_data_output"
        ),
    }
    for body, key in cases.items():
        response = client.post(
            "/v2/models/decoder/infer", content=body, headers={"content-type": "application/json"}
        )
        assert error(response, 400) == f"the key {key!r} appears twice in one JSON object; send each key once"
    # Nor is a parameter the protocol leaves free-form, such as tritonclient's timeout, on the request or
    # an input's, or a key inside a parameter's value.
    many = orjson.dumps({f"k{i}": i for i in range(40)})
    response = client.post(
        "/v2/models/decoder/infer", content=b'{"inputs": [' + z + b'], "parameters": ' + many + b"}"
    )
    assert response.status_code == 200, response.text
    for body, key in {
        b'{"inputs": [' + z + b'], "parameters": {"timeout": 1, "priority": 0, "timeout": 2}}': "timeout",
        b'{"inputs": [' + z[:-1] + b', "parameters": {"tag": 1, "tag": 2}}]}': "tag",
        b'{"inputs": [' + z + b'], "parameters": {"timeout": {"s": 1, "s": 2}}}': "s",
        # One name among many.
        b'{"inputs": [' + z + b'], "parameters": ' + many[:-1] + b', "k3": 0}}': "k3",
    }.items():
        response = client.post(
            "/v2/models/decoder/infer", content=body, headers={"content-type": "application/json"}
        )
        assert error(response, 400) == f"the key {key!r} appears twice in one JSON object; send each key once"
    # The same names in different objects are no repeat: each output names itself, with its parameters.
    outputs = [{"name": name, "parameters": {"binary_data": False}} for name in ("mu", "logvar")]
    request = {"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}
    response = client.post("/v2/models/encoder/infer", json={**request, "outputs": outputs})
    assert response.status_code == 200, response.text
    assert [output["name"] for output in response.json()["outputs"]] == ["mu", "logvar"]


def nested_z(depth: int) -> bytes:
    """A decoder request whose 16 latents are nested `depth` lists deep (as text: orjson stops at 255)."""
    data = b"[" * (depth - 1) + orjson.dumps([0.0] * 16) + b"]" * (depth - 1)
    return b'{"inputs":[{"name":"z","shape":[1,16],"datatype":"FP32","data":' + data + b"}]}"


def test_data_nested_deeper_than_its_shape_is_refused_for_its_depth(client: TestClient) -> None:
    headers = {"content-type": "application/json"}
    assert client.post("/v2/models/decoder/infer", content=nested_z(2), headers=headers).status_code == 200
    for depth in (3, 65):
        response = client.post("/v2/models/decoder/infer", content=nested_z(depth), headers=headers)
        assert error(response, 422) == (
            f"inputs[0].data is nested {depth} lists deep; shape [1, 16] has 2 dimensions"
        )


def test_nested_data_must_follow_the_shape(client: TestClient) -> None:
    """Nested data is the tensor as its shape nests it; the innermost list may hold the rest flat (a batch of
    flat images), and dimensions of 1 may be left out, or added within the shape's depth (they move no
    value). Nested otherwise, its values would be read in an order the client did not mean: a (16, 2)
    transpose of a (2, 16) batch decoded as two other latents."""
    z = np.arange(32, dtype=np.float32).reshape(2, 16) / 32
    x = digit_tensor(range(2))
    expected = outputs(client.post("/v2/models/decoder/infer", json={"inputs": [tensor("z", z)]}))["x_mean"]
    mu = outputs(client.post("/v2/models/encoder/infer", json={"inputs": [tensor("x", x)]}))["mu"]
    for data in (z.tolist(), z.flatten().tolist()):
        response = client.post(
            "/v2/models/decoder/infer", json={"inputs": [{**tensor("z", z), "data": data}]}
        )
        np.testing.assert_array_equal(outputs(response)["x_mean"], expected)
    for nesting in ((2, 64), (2, 1, 64), (2, 8, 8), (1, 128), (2, 1, 8, 8)):
        data = x.reshape(nesting).tolist()
        response = client.post(
            "/v2/models/encoder/infer", json={"inputs": [{**tensor("x", x), "data": data}]}
        )
        np.testing.assert_array_equal(outputs(response)["mu"], mu)
    one = {**tensor("x", x[:1]), "data": x[0, 0].tolist()}  # an 8x8 list for [1, 1, 8, 8]
    got = outputs(client.post("/v2/models/encoder/infer", json={"inputs": [one]}))["mu"]
    np.testing.assert_array_equal(got, mu[:1])
    for name, array, nesting in (
        ("z", z.T, "[16, 2]"),
        ("z", z.reshape(4, 8), "[4, 8]"),
        ("x", x.reshape(16, 8), "[16, 8]"),
        ("x", x.reshape(2, 4, 16), "[2, 4, 16]"),
    ):
        model = "decoder" if name == "z" else "encoder"
        request = {**tensor(name, z if name == "z" else x), "data": array.tolist()}
        response = client.post(f"/v2/models/{model}/infer", json={"inputs": [request]})
        shape = "[2, 16]" if name == "z" else "[2, 1, 8, 8]"
        assert error(response, 422) == (
            f"inputs[0].data is nested as {nesting}, which does not follow its shape {shape}: nest it as the "
            "shape, the innermost list holding the rest flat if need be, or send it flat"
        )
    # No values at all is what is wrong with [[]], not its nesting.
    response = client.post("/v2/models/decoder/infer", json={"inputs": [{**Z, "data": [[]]}]})
    assert error(response, 422) == "inputs[0].data has 0 values; shape [1, 16] takes 16"


def test_a_body_that_is_not_json_is_a_400(client: TestClient) -> None:
    response = client.post(
        "/v2/models/decoder/infer", content=b"{", headers={"content-type": "application/json"}
    )
    assert "Invalid JSON" in error(response, 400)


def test_binary_sizes_must_add_up(client: TestClient) -> None:
    z = np.zeros((1, 16), dtype=np.float32)
    for size in (60, 68):  # fewer and more than the bytes that follow
        declared = {"inputs": [{**Z, "data": None, "parameters": {"binary_data_size": size}}]}
        assert f"binary_data_size is {size} but 64 bytes follow" in error(
            client.post("/v2/models/decoder/infer", **binary_request(declared, z)), 400
        )
    extra = {"inputs": [{**Z, "data": None, "parameters": {"binary_data_size": 68}}]}
    longer = binary_request(extra, np.zeros((1, 17), dtype=np.float32))  # 68 bytes, as declared
    assert error(client.post("/v2/models/decoder/infer", **longer), 422) == (
        "inputs[0] has 68 bytes; shape [1, 16] of FP32 takes 64"
    )
    undeclared = {"inputs": [Z]}
    assert "64 bytes follow the JSON but inputs[0] has no binary_data_size" in error(
        client.post("/v2/models/decoder/infer", **binary_request(undeclared, z)), 400
    )
    body = binary_request(undeclared)["content"]
    for length in ("9999", "1" + "0" * 5000):  # past the body; past the digits int() reads (not a 500)
        wrong = {"content": body, "headers": {HEADER_LENGTH: length.encode()}}
        message = error(client.post("/v2/models/decoder/infer", **wrong), 400)
        assert message == f"{HEADER_LENGTH} is {quoted(length)} but the body has {len(body)} bytes"
    # Negative, a digit that int() does not read, a sign, inner space, nothing.
    for length in ("-1", "²", "+64", "6 4", ""):
        wrong = {"content": body, "headers": {HEADER_LENGTH: length.encode()}}
        message = error(client.post("/v2/models/decoder/infer", **wrong), 400)
        shown = length.encode().decode("latin-1")  # as the server decodes header bytes
        assert message == f"{HEADER_LENGTH} is {shown!r}; it must be a plain non-negative integer"


def test_spaces_around_the_header_length_are_accepted(client: TestClient) -> None:
    """As uvicorn's HTTP parser strips them before the app sees the header (RFC 9110, 5.5)."""
    request = binary_request({"inputs": [Z]})
    length = request["headers"][HEADER_LENGTH]
    for padded in (f" {length} ", f"\t{length}"):
        response = client.post(
            "/v2/models/decoder/infer", content=request["content"], headers={HEADER_LENGTH: padded}
        )
        assert response.status_code == 200, response.text


def test_binary_nan_is_refused(client: TestClient) -> None:
    z = np.full((1, 16), np.nan, dtype=np.float32)
    header = {"inputs": [{**Z, "data": None, "parameters": {"binary_data_size": 64}}]}
    response = client.post("/v2/models/decoder/infer", **binary_request(header, z))
    assert error(response, 422) == "inputs[0]'s binary data holds NaN or infinite values"


def test_kserves_client_body_is_served(client: TestClient) -> None:
    """KServe's REST client puts the model's name in the body too, and may send `parameters: null`."""
    plain = client.post("/v2/models/decoder/infer", json={"inputs": [Z]})
    kserve = {"id": "a", "model_name": "decoder", "parameters": None, "inputs": [{**Z, "parameters": None}]}
    response = client.post("/v2/models/decoder/infer", json=kserve)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"] == plain.json()["outputs"]
    other = client.post("/v2/models/decoder/infer", json={**kserve, "model_name": "encoder"})
    assert error(other, 400) == "model_name is 'encoder' but the path names decoder"
    versioned = client.post("/v2/models/decoder/infer", json={**kserve, "model_version": "1"})
    assert error(versioned, 400) == "model_version is '1'; model versions are not served (leave it out)"


def test_binary_framing_mistakes_are_named(client: TestClient) -> None:
    z = np.zeros((1, 16), dtype=np.float32)
    request = binary_request({"inputs": [{**Z, "data": None, "parameters": {"binary_data_size": 64}}]}, z)
    without_length = {**request, "headers": {"content-type": "application/octet-stream"}}
    assert error(client.post("/v2/models/decoder/infer", **without_length), 400).endswith(
        "; a body with binary tensor data gives the size of its JSON in Inference-Header-Content-Length"
    )
    short = {**request, "headers": {**request["headers"], "Inference-Header-Content-Length": "20"}}
    assert error(client.post("/v2/models/decoder/infer", **short), 400).startswith(
        "the body's first 20 bytes (Inference-Header-Content-Length) are no JSON: body: Invalid JSON"
    )


def test_values_from_the_request_are_cut_in_errors(client: TestClient) -> None:
    long_type = client.post("/v2/models/decoder/infer", json={"inputs": [{**Z, "datatype": "A" * 200_000}]})
    assert len(error(long_type, 422)) < 200
    huge_batch = client.post("/v2/models/decoder/infer", json={"inputs": [{**Z, "shape": [10**4000, 16]}]})
    message = error(huge_batch, 422)
    assert message.startswith("inputs[0].shape has a batch of 1000") and len(message) < 200
    long_shape = client.post("/v2/models/decoder/infer", json={"inputs": [{**Z, "shape": [1] * 5000}]})
    assert len(error(long_shape, 422)) < 200
    size = {**Z, "data": None, "parameters": {"binary_data_size": 10**4000}}
    header = json.dumps({"inputs": [size]}).encode()  # orjson writes 64-bit integers only
    framed = {HEADER_LENGTH: str(len(header)), "content-type": "application/octet-stream"}
    long_size = client.post("/v2/models/decoder/infer", content=header + bytes(64), headers=framed)
    assert len(error(long_size, 400)) < 200


def test_a_compressed_body_is_a_415(client: TestClient) -> None:
    response = client.post(
        "/v2/models/decoder/infer", json={"inputs": [Z]}, headers={"content-encoding": "gzip"}
    )
    assert "Content-Encoding 'gzip' is not supported" in error(response, 415)


def test_batches_beyond_the_servers_limit_are_refused(limited: TestClient) -> None:
    body = {"inputs": [{**Z, "shape": [4, 16], "data": [0.0] * 64}]}
    message = error(limited.post("/v2/models/decoder/infer", json=body), 422)
    assert message == "inputs[0].shape has a batch of 4; this server takes 1 to 3 (VAE_MAX_LATENTS)"


def test_every_error_under_v2_is_in_the_protocols_shape(settings: Settings) -> None:
    """Triton's clients read an error's message from `error`: the guards' refusals, unknown paths and wrong
    methods under /v2 answer in that shape too, while the rest of the API keeps FastAPI's `detail`."""
    keyed = settings.model_copy(update={"api_keys": [SecretStr("the-key")], "max_body_bytes": 1024})
    key = {"X-API-Key": "the-key"}
    with TestClient(create_app(keyed)) as guarded:
        infer = "/v2/models/decoder/infer"
        assert error(guarded.post(infer, json={"inputs": [Z]}), 401).startswith("an API key is required")
        assert error(guarded.post(infer, json={"inputs": [Z]}, headers={"X-API-Key": "x"}), 403) == (
            "the API key is not valid"
        )
        json_type = {**key, "content-type": "application/json"}
        too_long = guarded.post(infer, content=b" " * 2048, headers=json_type)
        assert "VAE_MAX_BODY_BYTES" in error(too_long, 413)
        assert error(guarded.get("/v2/nothing", headers=key), 404) == "Not Found"
        assert error(guarded.get(infer, headers=key), 405) == "Method Not Allowed"
        assert guarded.post("/decode", json={}).json() == {
            "detail": "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
        }
        schema = guarded.get("/openapi.json").json()
    documented = schema["paths"]["/v2/models/{model_name}/infer"]["post"]["responses"]
    assert documented["401"]["content"]["application/json"]["schema"]["$ref"].endswith("/ProtocolError")
    assert documented["413"]["content"]["application/json"]["schema"]["$ref"].endswith("/ProtocolError")
    decode = schema["paths"]["/decode"]["post"]["responses"]
    assert decode["401"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    # A model's metadata and readiness take only the name (a 404 when unknown): no validation error to list,
    # and a body sent with the GET is a 400. Readiness is a probe: no key needed.
    assert set(schema["paths"]["/v2/models/{model_name}"]["get"]["responses"]) == {
        "200",
        "400",
        "401",
        "403",
        "404",
        "503",
    }
    ready = schema["paths"]["/v2/models/{model_name}/ready"]["get"]["responses"]
    assert set(ready) == {"200", "400", "404", "503"}
    assert ready["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ProtocolError")


@pytest.mark.slow
def test_tritonclient_gets_what_encode_and_decode_give(model_dir: Path, free_port: int) -> None:
    process = uvicorn(free_port, service_env(model_dir))
    triton_client = None
    try:
        with httpx2.Client(base_url=f"http://127.0.0.1:{free_port}", timeout=5.0) as http:
            wait_ready(process, http)
            triton_client = triton.InferenceServerClient(url=f"127.0.0.1:{free_port}", network_timeout=5.0)
            assert triton_client.is_server_live() and triton_client.is_server_ready()
            assert triton_client.is_model_ready("encoder") and triton_client.is_model_ready("decoder")
            assert "binary_tensor_data" in triton_client.get_server_metadata()["extensions"]
            assert triton_client.get_model_metadata("decoder")["inputs"][0]["shape"] == [-1, 16]

            encoded = EncodeResponse.model_validate_json(
                http.post("/encode", files=files(*(digit_png(i) for i in range(4)))).content
            )
            x = digit_tensor(range(4))
            for binary in (True, False):  # the binary tensor extension (tritonclient's default), then JSON
                request = triton.InferInput("x", list(x.shape), "FP32")
                request.set_data_from_numpy(x, binary_data=binary)
                wanted = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("mu", "logvar")]
                result = triton_client.infer("encoder", [request], outputs=wanted)
                np.testing.assert_allclose(result.as_numpy("mu"), encoded.mu, rtol=0, atol=TOLERANCE)
                np.testing.assert_allclose(result.as_numpy("logvar"), encoded.logvar, rtol=0, atol=TOLERANCE)

            z = np.asarray(encoded.mu, dtype=np.float32)
            decoded = http.post("/decode?format=array", json={"latents": z.tolist()}).json()["images"]
            request = triton.InferInput("z", list(z.shape), "FP32")
            request.set_data_from_numpy(z)
            result = triton_client.infer("decoder", [request])  # no outputs named: all of them, as bytes
            np.testing.assert_allclose(result.as_numpy("x_mean"), decoded, rtol=0, atol=TOLERANCE)
            # The protocol's free-form parameters, as tritonclient sends them: accepted, the same result.
            hints = {"timeout": 5_000_000, "priority": 1, "sequence_id": 7, "parameters": {"note": "x"}}
            result = triton_client.infer("decoder", [request], **hints)
            np.testing.assert_allclose(result.as_numpy("x_mean"), decoded, rtol=0, atol=TOLERANCE)

            with pytest.raises(InferenceServerException) as refused:
                triton_client.infer("vae", [request])
            assert refused.value.status() == "404"
            assert refused.value.message() == "model 'vae' is not served here; the models: encoder, decoder"
    finally:
        if triton_client is not None:
            triton_client.close()
        stop(process)


@pytest.mark.parametrize("size", ["64", 64.0, True])
def test_a_binary_size_that_is_no_integer_is_named_as_such(client: TestClient, size: object) -> None:
    declared = {"inputs": [{**Z, "data": None, "parameters": {"binary_data_size": size}}]}
    message = error(
        client.post("/v2/models/decoder/infer", **binary_request(declared, np.zeros((1, 16), np.float32))),
        400,
    )
    assert message == f"inputs[0].parameters.binary_data_size is {size!r}; it must be an integer (bytes)"


def test_encoder_inputs_outside_the_pixel_range_are_refused(client: TestClient) -> None:
    x = {"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32"}
    assert (
        client.post("/v2/models/encoder/infer", json={"inputs": [{**x, "data": [1.0] * 64}]}).status_code
        == 200
    )
    for value in (-1e6, 1.5):
        response = client.post("/v2/models/encoder/infer", json={"inputs": [{**x, "data": [value] * 64}]})
        assert error(response, 422) == "inputs[0].data holds values outside [0, 1], the encoder's pixel range"


def test_the_encoder_takes_x_in_the_cards_pixel_range_as_it_is(
    settings: Settings, model_dir: Path, tmp_path: Path
) -> None:
    """A model trained on pixels in [-1, 1] is sent x in [-1, 1], and runs on it unchanged: the same
    posterior /encode gives for the images (read in [0, 1], then mapped to [-1, 1])."""
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    card = json.loads((copy / "model.json").read_text())
    card["input"]["pixel_range"] = [-1.0, 1.0]
    (copy / "model.json").write_text(json.dumps(card))
    x = 2 * digit_tensor(range(3)) - 1
    with TestClient(create_app(settings.model_copy(update={"model_dir": copy}))) as minus_one_to_one:
        got = outputs(minus_one_to_one.post("/v2/models/encoder/infer", json={"inputs": [tensor("x", x)]}))
        encoded = EncodeResponse.model_validate_json(
            minus_one_to_one.post("/encode", files=files(*(digit_png(i) for i in range(3)))).content
        )
        np.testing.assert_allclose(got["mu"], encoded.mu, rtol=0, atol=TOLERANCE)
        np.testing.assert_allclose(got["logvar"], encoded.logvar, rtol=0, atol=TOLERANCE)
        outside = minus_one_to_one.post("/v2/models/encoder/infer", json={"inputs": [tensor("x", x - 0.5)]})
        assert error(outside, 422) == "inputs[0].data holds values outside [-1, 1], the encoder's pixel range"


def test_a_body_of_far_too_many_values_is_refused_unparsed(client: TestClient, settings: Settings) -> None:
    """Counted, not parsed: 16 MiB of numbers took 1.5 s on the event loop to parse and check."""
    most = 2 * max(settings.max_images * 64, settings.max_latents * 16) + 256
    body = b'{"inputs":[{"name":"z","shape":[1,16],"datatype":"FP32","data":[' + b"0," * most + b"0]}]}"
    response = client.post(
        "/v2/models/decoder/infer", content=body, headers={"content-type": "application/json"}
    )
    assert error(response, 422) == (
        f"the request holds more than {most} values; one within this server's limits "
        f"(VAE_MAX_IMAGES, VAE_MAX_LATENTS) holds at most {most // 2}"
    )
    # A request at the limits is still read (and refused for its own shape, here).
    at_limit = {
        "inputs": [{**Z, "shape": [settings.max_latents, 16], "data": [0.0] * (settings.max_latents * 16)}]
    }
    assert client.post("/v2/models/decoder/infer", json=at_limit).status_code == 200
