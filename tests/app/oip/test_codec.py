"""The protocol's bodies without HTTP: tritonclient's own request builder and response parser on one side,
app/oip/codec.py on the other."""

from __future__ import annotations

import gzip
import json
import zlib

import numpy as np
import pytest
import tritonclient.http as triton

from app.errors import BadRequest
from app.oip.codec import (
    InferRequest,
    RequestedOutput,
    TensorSpec,
    decompress,
    infer_response,
    parse_infer_request,
)

IMAGES = TensorSpec("images", (-1, 1, 28, 28))
OUTPUTS = ("mean", "log_var")


def parse(body: bytes, header_length: int | str | None = None, max_batch_size: int = 64) -> InferRequest:
    length = None if header_length is None else str(header_length)
    return parse_infer_request(body, length, [IMAGES], OUTPUTS, max_batch_size)


def tritonclient_body(
    array: np.ndarray, binary: bool, outputs: list[triton.InferRequestedOutput] | None = None
) -> tuple[bytes, int | None]:
    tensor = triton.InferInput("images", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array, binary_data=binary)
    body, json_size = triton.InferenceServerClient.generate_request_body([tensor], outputs=outputs)
    return body, json_size


def json_body(**request: object) -> bytes:
    return json.dumps(request).encode()


def images_input(**overrides: object) -> dict[str, object]:
    return {"name": "images", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.5] * 784, **overrides}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_requests_read_back_exactly(binary: bool) -> None:
    array = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    body, json_size = tritonclient_body(array, binary)
    assert (json_size is not None) == binary
    request = parse(body, json_size)
    np.testing.assert_array_equal(request.inputs["images"], array)
    assert request.inputs["images"].dtype == np.float32
    # No outputs named: tritonclient asks for all of them in binary.
    assert request.outputs == [RequestedOutput("mean", True), RequestedOutput("log_var", True)]


def test_nested_and_flat_json_data_are_the_same_tensor() -> None:
    array = np.random.default_rng(1).random((2, 1, 28, 28)).astype(np.float32)
    flat = parse(json_body(inputs=[images_input(shape=[2, 1, 28, 28], data=array.ravel().tolist())]))
    nested = parse(json_body(inputs=[images_input(shape=[2, 1, 28, 28], data=array.tolist())]))
    np.testing.assert_array_equal(flat.inputs["images"], array)
    np.testing.assert_array_equal(nested.inputs["images"], array)


def test_requested_outputs_choose_binary_per_output_over_the_request_default() -> None:
    body = json_body(
        id="request-7",
        parameters={"binary_data_output": True},
        inputs=[images_input()],
        outputs=[{"name": "log_var", "parameters": {"binary_data": False}}, {"name": "mean"}],
    )
    request = parse(body)
    assert request.id == "request-7"
    assert request.outputs == [RequestedOutput("log_var", False), RequestedOutput("mean", True)]
    assert parse(json_body(inputs=[images_input()])).outputs == [
        RequestedOutput("mean", False),
        RequestedOutput("log_var", False),
    ]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_responses_read_back_through_tritonclient(binary: bool) -> None:
    mean = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
    log_var = np.random.default_rng(3).standard_normal((3, 16)).astype(np.float32)
    outputs = [(RequestedOutput("mean", binary), mean), (RequestedOutput("log_var", False), log_var)]
    body, header_length = infer_response("m-encoder", "1", "abc", outputs)
    assert (header_length is not None) == binary
    result = triton.InferResult.from_response_body(body, header_length=header_length)
    np.testing.assert_array_equal(result.as_numpy("mean"), mean)
    np.testing.assert_array_equal(result.as_numpy("log_var"), log_var)
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("m-encoder", "1", "abc")


def test_a_response_without_request_id_has_none() -> None:
    body, _ = infer_response("m", "1", None, [(RequestedOutput("mean", False), np.zeros((1, 2), np.float32))])
    assert "id" not in json.loads(body)


BINARY_ZEROS = np.zeros((1, 1, 28, 28), np.float32).tobytes()


def binary_request(size: object, data: bytes = BINARY_ZEROS) -> tuple[bytes, int]:
    header = json_body(
        inputs=[
            {
                "name": "images",
                "shape": [1, 1, 28, 28],
                "datatype": "FP32",
                "parameters": {"binary_data_size": size},
            }
        ]
    )
    return header + data, len(header)


BAD_REQUESTS: list[tuple[str, bytes, int | str | None, str]] = [
    ("not json", b"{inputs", None, "not valid JSON"),
    ("nan is not json", b'{"inputs": [{"data": [NaN]}]}', None, "not valid JSON"),
    ("not an object", b"[1, 2]", None, "must be a JSON object"),
    ("no inputs", json_body(outputs=[]), None, "'inputs' must be a non-empty list"),
    ("id not a string", json_body(id=3, inputs=[images_input()]), None, "'id' must be a string"),
    ("unknown input", json_body(inputs=[images_input(name="pixels")]), None, "unknown input 'pixels'"),
    ("twice", json_body(inputs=[images_input(), images_input()]), None, "given twice"),
    (
        "unknown datatype",
        json_body(inputs=[images_input(datatype="FLOAT")]),
        None,
        "not one of the protocol's",
    ),
    (
        "wrong datatype",
        json_body(inputs=[images_input(datatype="FP64")]),
        None,
        "has datatype FP64; this model takes FP32",
    ),
    (
        "wrong shape",
        json_body(inputs=[images_input(shape=[1, 28, 28])]),
        None,
        "this model takes [-1, 1, 28, 28]",
    ),
    (
        "shape of text",
        json_body(inputs=[images_input(shape="1x784")]),
        None,
        "must be a list of whole numbers",
    ),
    ("negative dim", json_body(inputs=[images_input(shape=[-1, 1, 28, 28])]), None, "whole numbers"),
    ("empty batch", json_body(inputs=[images_input(shape=[0, 1, 28, 28], data=[])]), None, "a batch of 0"),
    ("batch too large", json_body(inputs=[images_input(shape=[65, 1, 28, 28])]), None, "may carry 1 to 64"),
    (
        "count",
        json_body(inputs=[images_input(data=[0.5] * 783)]),
        None,
        "has 783 values, but its shape [1, 1, 28, 28] needs 784",
    ),
    ("ragged", json_body(inputs=[images_input(data=[[0.5] * 392, [0.5] * 391])]), None, "ragged"),
    ("strings", json_body(inputs=[images_input(data=["0.5"] * 784)]), None, "must be numbers only"),
    ("booleans", json_body(inputs=[images_input(data=[True] * 784)]), None, "must be numbers only"),
    ("no data", json_body(inputs=[images_input(data=None)]), None, "no 'data' list"),
    ("infinite", json_body(inputs=[images_input(data=[1e39] * 784)]), None, "NaN or infinite"),
    (
        "unknown output",
        json_body(inputs=[images_input()], outputs=[{"name": "z"}]),
        None,
        "unknown output 'z'; this model returns 'mean', 'log_var'",
    ),
    (
        "classification",
        json_body(inputs=[images_input()], outputs=[{"name": "mean", "parameters": {"classification": 3}}]),
        None,
        "classification extension is not supported",
    ),
    (
        "binary flag",
        json_body(inputs=[images_input()], parameters={"binary_data_output": "yes"}),
        None,
        "true or false",
    ),
    ("header length text", binary_request(3136)[0], "ten", "Inference-Header-Content-Length is 'ten'"),
    ("header length past the end", binary_request(3136)[0], 10**6, "at most the body's"),
    (
        "binary size wrong",
        *binary_request(3000, BINARY_ZEROS[:3000]),
        "binary_data_size 3000; shape [1, 1, 28, 28] in FP32 is 3136 bytes",
    ),
    ("binary short", *binary_request(3136, BINARY_ZEROS[:100]), "only 100 follow the JSON header"),
    (
        "binary trailing bytes",
        *binary_request(3136, BINARY_ZEROS + b"\0" * 4),
        "3140 bytes of binary tensor data",
    ),
    ("binary without its header length", binary_request(3136)[0], None, "not valid JSON"),
]


@pytest.mark.parametrize(
    ("body", "header_length", "message"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_requests_are_400_saying_what_is_wrong(
    body: bytes, header_length: int | None, message: str
) -> None:
    with pytest.raises(BadRequest) as raised:
        parse(body, header_length)
    assert raised.value.status == 400
    assert message in raised.value.detail


def test_data_and_binary_size_together_are_refused() -> None:
    header = json_body(inputs=[images_input(parameters={"binary_data_size": 3136})])
    with pytest.raises(BadRequest, match=r"both .data. and parameters\.binary_data_size"):
        parse(header + BINARY_ZEROS, len(header))


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [("gzip", gzip.compress), ("deflate", zlib.compress)],
)
def test_compressed_bodies_are_read_as_tritonclient_compresses_them(encoding: str, compress: object) -> None:
    body = json_body(inputs=[images_input()])
    assert callable(compress)
    assert decompress(compress(body), encoding, 10**6) == body
    assert decompress(body, None, 10**6) == body


def test_decompression_is_bounded_and_checked() -> None:
    bomb = gzip.compress(b"\0" * 10**6)
    with pytest.raises(BadRequest, match="larger than the limit of 1000 bytes"):
        decompress(bomb, "gzip", 1000)
    with pytest.raises(BadRequest, match="not valid gzip"):
        decompress(b"plain text", "gzip", 1000)
    with pytest.raises(BadRequest, match="truncated"):
        decompress(gzip.compress(b"x" * 100)[:-12], "gzip", 1000)
    with pytest.raises(BadRequest, match="'br' is not supported"):
        decompress(b"", "br", 1000)


def test_image_values_outside_the_models_range_are_refused_with_advice() -> None:
    images = TensorSpec("images", (-1, 1, 28, 28), value_range=(0.0, 1.0))
    pixels = json_body(inputs=[images_input(data=[255.0] * 784)])
    with pytest.raises(BadRequest, match=r"lie in \[255, 255\]; this model takes \[0, 1\] .*divide by 255"):
        parse_infer_request(pixels, None, [images], OUTPUTS, 64)
    in_range = json_body(inputs=[images_input(data=[0.0, 1.0] * 392)])
    assert parse_infer_request(in_range, None, [images], OUTPUTS, 64).inputs["images"].max() == 1.0


@pytest.mark.parametrize("header_length", ["\u00b2", "1" * 5000, "-1", " ", "0x10"])
def test_a_header_length_that_is_not_a_plain_number_is_a_400(header_length: str) -> None:
    with pytest.raises(BadRequest, match="Inference-Header-Content-Length is"):
        parse(binary_request(3136)[0], header_length)


def test_binary_sizes_without_the_header_length_say_which_header_is_missing() -> None:
    header = json_body(inputs=[{**images_input(data=None), "parameters": {"binary_data_size": 3136}}])
    with pytest.raises(BadRequest, match="no Inference-Header-Content-Length header"):
        parse(header)
    # "data": null beside binary data is no data.
    assert parse(header + BINARY_ZEROS, len(header)).inputs["images"].shape == (1, 1, 28, 28)


def test_outputs_requested_twice_and_uneven_nesting_are_refused() -> None:
    twice = json_body(inputs=[images_input()], outputs=[{"name": "mean"}, {"name": "mean"}])
    with pytest.raises(BadRequest, match="'mean' is requested twice"):
        parse(twice)
    short = json_body(inputs=[images_input(data=[[[[0.5] * 28] * 28]] * 2)])  # two images for one
    with pytest.raises(BadRequest, match="has 1568 values, but its shape"):
        parse(short)
