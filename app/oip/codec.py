"""Inference bodies of the Open Inference Protocol as numpy arrays: JSON, or a JSON header followed by raw
little-endian tensors (the binary tensor extension), both ways. Plain functions; no HTTP in here.

A body is binary when the request carries `Inference-Header-Content-Length` (the JSON header's length in
bytes); Content-Type is never consulted, since tritonclient sends none.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from app.errors import BadRequest

HEADER_LENGTH_HEADER = "Inference-Header-Content-Length"
BINARY_MEDIA_TYPE = "application/octet-stream"
HEADER_LENGTH_FORMAT = re.compile(r"[0-9]{1,12}")  # ASCII digits only: str.isdigit() takes "²"
# The protocol's tensor datatypes. The models served here take and return FP32 only.
DATATYPES = (
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BF16",
    "BYTES",
)
# Request bodies compressed as tritonclient's request_compression_algorithm does it: zlib window bits.
CONTENT_ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model: its name and shape, -1 for the batch axis, and for inputs the range
    their values must lie in (images: the manifest's value_range). Datatype FP32."""

    name: str
    shape: tuple[int, ...]
    datatype: str = "FP32"
    value_range: tuple[float, float] | None = None

    def describe(self) -> dict[str, Any]:
        """As model metadata lists it."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def shown_shape(self) -> str:
        return "[" + ", ".join(str(dim) for dim in self.shape) + "]"


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    """A parsed request: its id, one float32 array per input (shape as sent), and the outputs to return."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput]


def decompress(body: bytes, content_encoding: str | None, max_bytes: int) -> bytes:
    """The body as sent before `Content-Encoding` gzip or deflate; at most `max_bytes` once decompressed."""
    if content_encoding is None or content_encoding.strip().lower() in ("", "identity"):
        return body
    wbits = CONTENT_ENCODINGS.get(content_encoding.strip().lower())
    if wbits is None:
        raise BadRequest(
            f"Content-Encoding {content_encoding!r} is not supported; send gzip, deflate or an "
            "uncompressed body"
        )
    decompressor = zlib.decompressobj(wbits)
    try:
        plain = decompressor.decompress(body, max_bytes + 1)
    except zlib.error as error:
        raise BadRequest(f"the body is not valid {content_encoding} data: {error}") from None
    if len(plain) > max_bytes:
        raise BadRequest(f"the decompressed body is larger than the limit of {max_bytes} bytes")
    if not decompressor.eof:
        raise BadRequest(f"the body is truncated {content_encoding} data")
    return plain


def parse_infer_request(
    body: bytes,
    header_length: str | None,
    inputs: Sequence[TensorSpec],
    output_names: Sequence[str],
    max_batch_size: int,
) -> InferRequest:
    """Read an inference request for a model with these inputs and outputs. Raises BadRequest (400) saying
    what was wrong and what is allowed: JSON, shapes, datatypes, element counts, binary sizes, batch size."""
    json_length = _json_length(header_length, len(body))
    try:
        header = orjson.loads(body[:json_length] if json_length is not None else body)
    except orjson.JSONDecodeError as error:
        raise BadRequest(f"the inference request is not valid JSON: {error}") from None
    if not isinstance(header, dict):
        raise BadRequest("the inference request must be a JSON object with 'inputs'")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest(f"'id' must be a string, got {request_id!r}")
    binary = memoryview(body)[json_length:] if json_length is not None else memoryview(b"")
    arrays = _read_inputs(header.get("inputs"), binary, inputs, max_batch_size)
    parameters = _parameters(header, "the request")
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise BadRequest("parameters.binary_data_output must be true or false")
    outputs = _requested_outputs(header.get("outputs"), output_names, binary_default)
    return InferRequest(request_id, arrays, outputs)


def _json_length(header_length: str | None, body_bytes: int) -> int | None:
    if header_length is None:
        return None
    if not HEADER_LENGTH_FORMAT.fullmatch(header_length.strip()) or int(header_length) > body_bytes:
        raise BadRequest(
            f"{HEADER_LENGTH_HEADER} is {header_length!r}; it must be the length in bytes of the JSON header "
            f"at the start of the body, at most the body's {body_bytes} bytes"
        )
    return int(header_length)


def _parameters(entry: Mapping[str, Any], what: str) -> Mapping[str, Any]:
    parameters = entry.get("parameters", {})
    if not isinstance(parameters, dict):
        raise BadRequest(f"parameters of {what} must be a JSON object")
    return parameters


def _read_inputs(
    entries: object, binary: memoryview, specs: Sequence[TensorSpec], max_batch_size: int
) -> dict[str, np.ndarray]:
    expected = {spec.name: spec for spec in specs}
    names = ", ".join(repr(name) for name in expected)
    if not isinstance(entries, list) or not entries:
        raise BadRequest(f"'inputs' must be a non-empty list of tensors; this model takes {names}")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for entry in entries:
        if not isinstance(entry, dict):
            raise BadRequest("each entry of 'inputs' must be a JSON object with name, shape, datatype, data")
        name = entry.get("name")
        spec = expected.get(name) if isinstance(name, str) else None
        if spec is None:
            raise BadRequest(f"unknown input {name!r}; this model takes {names}")
        if name in arrays:
            raise BadRequest(f"input {name!r} is given twice")
        shape = _checked_shape(entry, spec, max_batch_size)
        array, offset = _input_values(entry, spec, shape, binary, offset)
        _check_values(array, spec)
        arrays[spec.name] = array
    if offset != len(binary):
        raise BadRequest(
            f"the body has {len(binary)} bytes of binary tensor data after the JSON header, but the inputs' "
            f"binary_data_size add up to {offset}"
        )
    missing = [name for name in expected if name not in arrays]
    if missing:
        raise BadRequest(f"input {missing[0]!r} is missing; this model takes {names}")
    return arrays


def _check_values(array: np.ndarray, spec: TensorSpec) -> None:
    if not np.isfinite(array).all():
        raise BadRequest(f"input {spec.name!r} holds NaN or infinite values; send finite numbers")
    if spec.value_range is not None:
        low, high = spec.value_range
        smallest, largest = float(array.min()), float(array.max())
        if smallest < low or largest > high:
            raise BadRequest(
                f"the values of input {spec.name!r} lie in [{smallest:g}, {largest:g}]; this model takes "
                f"[{low:g}, {high:g}] (8-bit pixels: divide by 255)"
            )


def _checked_shape(entry: Mapping[str, Any], spec: TensorSpec, max_batch_size: int) -> tuple[int, ...]:
    datatype, shape = entry.get("datatype"), entry.get("shape")
    if datatype not in DATATYPES:
        raise BadRequest(
            f"input {spec.name!r} has datatype {datatype!r}, which is not one of the protocol's "
            f"({', '.join(DATATYPES)}); it takes {spec.datatype}"
        )
    if datatype != spec.datatype:
        raise BadRequest(f"input {spec.name!r} has datatype {datatype}; this model takes {spec.datatype}")
    if not isinstance(shape, list) or not all(type(dim) is int and dim >= 0 for dim in shape):
        raise BadRequest(f"the shape of input {spec.name!r} must be a list of whole numbers, got {shape!r}")
    if len(shape) != len(spec.shape) or any(
        want != -1 and dim != want for dim, want in zip(shape, spec.shape, strict=True)
    ):
        raise BadRequest(
            f"input {spec.name!r} has shape {shape}; this model takes {spec.shown_shape()} "
            "(-1: the batch size)"
        )
    if not 1 <= shape[0] <= max_batch_size:
        raise BadRequest(
            f"input {spec.name!r} has a batch of {shape[0]}; one request may carry 1 to {max_batch_size}"
        )
    return tuple(shape)


def _input_values(
    entry: Mapping[str, Any], spec: TensorSpec, shape: tuple[int, ...], binary: memoryview, offset: int
) -> tuple[np.ndarray, int]:
    """The input's values as float32 of `shape`, from JSON `data` or the binary region at `offset`; and the
    offset after it."""
    count = math.prod(shape)
    binary_size = _parameters(entry, f"input {spec.name!r}").get("binary_data_size")
    if binary_size is not None:
        if entry.get("data") is not None:
            raise BadRequest(f"input {spec.name!r} has both 'data' and parameters.binary_data_size; send one")
        if not binary:
            raise BadRequest(
                f"input {spec.name!r} has parameters.binary_data_size, but the request has no "
                f"{HEADER_LENGTH_HEADER} header giving the length of its JSON part"
            )
        if type(binary_size) is not int or binary_size != count * 4:
            raise BadRequest(
                f"input {spec.name!r} has binary_data_size {binary_size!r}; shape {list(shape)} in FP32 is "
                f"{count * 4} bytes"
            )
        if offset + binary_size > len(binary):
            raise BadRequest(
                f"input {spec.name!r} needs {binary_size} bytes of binary data from byte {offset}, but only "
                f"{len(binary)} follow the JSON header"
            )
        values = np.frombuffer(binary, dtype="<f4", count=count, offset=offset)
        return values.astype(np.float32, copy=False).reshape(shape), offset + binary_size
    data = entry.get("data")
    if not isinstance(data, list):
        raise BadRequest(
            f"input {spec.name!r} has no 'data' list and no parameters.binary_data_size; send its values "
            "row-major, flat or nested"
        )
    outer = _outer_count(data)
    if outer != count:  # before converting: a body of millions of numbers is refused cheaply
        raise BadRequest(f"input {spec.name!r} has {outer} values, but its shape {list(shape)} needs {count}")
    try:
        values = np.asarray(data)
    except ValueError:
        raise BadRequest(f"the data of input {spec.name!r} is ragged: nested lists must be even") from None
    if values.dtype.kind not in "iuf":
        raise BadRequest(f"the data of input {spec.name!r} must be numbers only")
    if values.size != count:
        raise BadRequest(
            f"input {spec.name!r} has {values.size} values, but its shape {list(shape)} needs {count}"
        )
    with np.errstate(over="ignore"):  # values beyond float32 become inf, refused as non-finite
        return values.astype(np.float32).reshape(shape), offset


def _outer_count(data: list[Any]) -> int:
    """How many values `data` holds if it is as even as its first elements say (numpy checks the rest)."""
    count, level = 1, data
    while isinstance(level, list):
        count *= len(level)
        if not level:
            break
        level = level[0]
    return count


def _requested_outputs(
    entries: object, output_names: Sequence[str], binary_default: bool
) -> list[RequestedOutput]:
    if entries is None:
        return [RequestedOutput(name, binary_default) for name in output_names]
    names = ", ".join(repr(name) for name in output_names)
    if not isinstance(entries, list) or not entries:
        raise BadRequest(f"'outputs' must be a non-empty list, or left out for all of {names}")
    requested: list[RequestedOutput] = []
    for entry in entries:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or name not in output_names:
            raise BadRequest(f"unknown output {name!r}; this model returns {names}")
        parameters = _parameters(entry, f"output {name!r}")
        if parameters.get("classification"):
            raise BadRequest("the classification extension is not supported: these models return tensors")
        binary = parameters.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise BadRequest(f"parameters.binary_data of output {name!r} must be true or false")
        if any(output.name == name for output in requested):
            raise BadRequest(f"output {name!r} is requested twice")
        requested.append(RequestedOutput(name, binary))
    return requested


def infer_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    results: Sequence[tuple[RequestedOutput, np.ndarray]],
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it (else None)."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for output, array in results:
        described: dict[str, Any] = {"name": output.name, "datatype": "FP32", "shape": list(array.shape)}
        values = np.ascontiguousarray(array, dtype="<f4")
        if output.binary:
            blobs.append(values.tobytes())
            described["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            described["data"] = values.ravel()
        outputs.append(described)
    body: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        body["id"] = request_id
    body["outputs"] = outputs
    header = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
