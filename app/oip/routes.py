"""The Open Inference Protocol's HTTP endpoints: health, server and model metadata, readiness, inference, and
the repository extension (index, load, unload). Each model of the repository appears as two protocol models,
`<name>-encoder` and `<name>-decoder`, at its manifest's version; their requests go through the same batchers
as /models/<name>/encode and /decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse, Response

from app.auth import ADMIN_TAG, INFERENCE_PROTOCOL_TAG
from app.control import ModelControl
from app.engine import Engine
from app.errors import BadRequest, NonFiniteValues, ReloadFailed, UnknownModel
from app.oip.codec import (
    BINARY_MEDIA_TYPE,
    HEADER_LENGTH_HEADER,
    TensorSpec,
    decompress,
    infer_response,
    parse_infer_request,
)
from app.registry import MODEL_SCOPE_KEY, ModelRegistry, ServedModel
from app.repository import shown
from app.serving import MODEL_VERSION_HEADER, OPS_TAG, model_registry, serving
from model.manifest import Manifest

PROTOCOL_PREFIX = "/v2"
READINESS_PATH = PROTOCOL_PREFIX + "/health/ready"
SERVER_NAME = "vae-service"
EXTENSIONS = ["binary_tensor_data"]
PLATFORM = "onnxruntime_onnx"  # Triton's name for models run by onnxruntime

router = APIRouter(prefix=PROTOCOL_PREFIX)
Part = Literal["encoder", "decoder"]


@dataclass(frozen=True)
class ProtocolModel:
    """One part of the served model as the protocol names and describes it."""

    name: str
    version: str
    part: Part
    input: TensorSpec
    outputs: tuple[TensorSpec, ...]

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": PLATFORM,
            "inputs": [self.input.describe()],
            "outputs": [output.describe() for output in self.outputs],
        }


PARTS: tuple[Part, Part] = ("encoder", "decoder")
# Triton's model states, by the registry's.
PROTOCOL_STATES = {
    "ready": "READY",
    "loading": "LOADING",
    "unloading": "UNLOADING",
    "unavailable": "UNAVAILABLE",
}


def protocol_models(name: str, manifest: Manifest) -> dict[str, ProtocolModel]:
    """The encoder and the decoder of the model `name` with `manifest`, by protocol name."""
    names, images, latents = manifest.tensors, (-1, *manifest.image.shape), (-1, manifest.latent_dim)
    decoder_outputs = [TensorSpec(names.decoder_output, images)]
    if names.decoder_logits is not None:
        decoder_outputs.append(TensorSpec(names.decoder_logits, images))
    models = (
        ProtocolModel(
            f"{name}-encoder",
            manifest.version,
            "encoder",
            TensorSpec(names.encoder_input, images, value_range=manifest.image.value_range),
            (TensorSpec(names.encoder_mean, latents), TensorSpec(names.encoder_log_var, latents)),
        ),
        ProtocolModel(
            f"{name}-decoder",
            manifest.version,
            "decoder",
            TensorSpec(names.decoder_input, latents),
            tuple(decoder_outputs),
        ),
    )
    return {model.name: model for model in models}


def repository_model(registry: ModelRegistry, name: str) -> ServedModel:
    """The repository model a protocol name means: `<name>-encoder`, `<name>-decoder`, or `<name>` itself;
    UnknownModel (404) naming every protocol model."""
    for part in PARTS:
        if name.endswith("-" + part) and name.removesuffix("-" + part) in registry.models:
            return registry.models[name.removesuffix("-" + part)]
    if name in registry.models:
        return registry.models[name]
    served = shown(f"{model}-{part}" for model in registry.models for part in PARTS)
    raise UnknownModel(f"there is no model {name!r}; this server serves {served}")


def find_model(request: Request, name: str, version: str | None) -> tuple[ServedModel, ProtocolModel]:
    """The repository model and the protocol model `name` (at `version`, when given) once ready: 404 naming
    what is served, 503 while it is not ready or not loaded."""
    registry = model_registry(request, READINESS_PATH)
    served = repository_model(registry, name)
    engine = registry.ready_engine(served.name, READINESS_PATH)
    request.scope[MODEL_SCOPE_KEY] = served.name
    model = protocol_models(served.name, engine.manifest).get(name)
    if model is None:
        raise UnknownModel(
            f"there is no model {name!r}; ask for {served.name}-encoder or {served.name}-decoder"
        )
    if version is not None and version != model.version:
        raise UnknownModel(f"model {name!r} has no version {version!r}; it serves version {model.version!r}")
    return served, model


def infer_queue(method: str, path: str, registry: ModelRegistry) -> tuple[str, Part] | None:
    """The model and batcher queue an inference request on `path` enters first, for the load shedder; None
    for other requests, and for models this server does not serve (they get their 404)."""
    if method != "POST" or not path.startswith("/v2/models/"):
        return None
    segments = path.split("/")  # "", "v2", "models", name, ["versions", version,] "infer"
    if len(segments) not in (5, 7) or segments[-1] != "infer":
        return None
    name = segments[3]
    for part in PARTS:
        model = name.removesuffix("-" + part)
        if model != name and model in registry.models:
            return model, part
    return None


async def run_model(engine: Engine, model: ProtocolModel, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of `model` for `inputs`, through the engine's batchers, by output name."""
    names = engine.manifest.tensors
    if model.part == "encoder":
        mean, log_var = await engine.encode(inputs)
        if not (np.isfinite(mean).all() and np.isfinite(log_var).all()):
            raise BadRequest("the encoder produced non-finite values for these images")
        return {names.encoder_mean: mean, names.encoder_log_var: log_var}
    try:
        images, logits = await engine.decode_with_logits(inputs)
    except NonFiniteValues as error:
        raise BadRequest(error.detail) from None
    outputs = {names.decoder_output: images}
    if names.decoder_logits is not None and logits is not None:
        outputs[names.decoder_logits] = logits
    return outputs


class ProtocolError(BaseModel):
    """Every error on /v2, as the protocol's clients read it."""

    error: str = Field(description="What was wrong, and what is allowed.")


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for the batch axis.")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelReadiness(BaseModel):
    name: str
    ready: bool


class RepositoryEntry(BaseModel):
    name: str
    version: str
    state: str
    reason: str


class InferenceTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(default=None, description="Row-major values, flat or nested.")


class RequestedTensor(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferenceTensor]
    outputs: list[RequestedTensor] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferenceTensor]


def _request_body_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    """The inference request's JSON schema, its nested models referenced from the document's components
    (a schema's own `$defs` do not resolve inside an OpenAPI document), and those models."""
    schema = InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    return schema, schema.pop("$defs", {})


_INFER_REQUEST_SCHEMA, _INFER_REQUEST_MODELS = _request_body_schema()


def document_protocol(schema: dict[str, Any]) -> None:
    """Finish the OpenAPI document for /v2: add the inference request's nested models to the components,
    drop the 422 FastAPI documents for every route with parameters (on /v2 a bad body is a 400, and path
    parameters take any text, so 422 never comes back), and give 401 the protocol's error body."""
    schema.setdefault("components", {}).setdefault("schemas", {}).update(_INFER_REQUEST_MODELS)
    protocol_error = {"application/json": {"schema": ProtocolError.model_json_schema()}}
    for path, operations in schema.get("paths", {}).items():
        if path.startswith(PROTOCOL_PREFIX):
            for operation in operations.values():
                responses = operation.get("responses", {})
                responses.pop("422", None)
                for status in (
                    "401",
                    "403",
                ):  # app/auth.py documents them as problem JSON, which /v2 rewrites
                    if status in responses:
                        responses[status]["content"] = protocol_error


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "Bad request: body, JSON, shape, datatype, element count or binary size.",
        404: "No such model or version.",
        413: "Body too large.",
        503: "Not ready, or the queue is full (see Retry-After).",
        504: "Deadline exceeded.",
    }
    schema = {"application/json": {"schema": ProtocolError.model_json_schema()}}
    return {status: {"content": schema, "description": descriptions[status]} for status in statuses}


_INFER_DOCS: dict[str, Any] = {
    "summary": "Run the encoder or the decoder (JSON, or binary tensors)",
    "description": "JSON body, or with `Inference-Header-Content-Length: <n>` a JSON header of n bytes "
    "followed by each input's raw little-endian FP32 values (`parameters.binary_data_size`). Outputs come "
    "back as binary when requested (`parameters.binary_data` per output, `binary_data_output` for all), "
    "with the JSON header's length in `Inference-Header-Content-Length`.",
    "tags": [INFERENCE_PROTOCOL_TAG],
    "response_model": InferenceResponse,
    "responses": {
        **_errors(400, 404, 413, 503, 504),
        200: {"content": {BINARY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}},
    },
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": _INFER_REQUEST_SCHEMA},
                BINARY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
}
_METADATA_DOCS: dict[str, Any] = {
    "summary": "A model's inputs and outputs",
    "tags": [INFERENCE_PROTOCOL_TAG],
    "response_model": ModelMetadata,
    "responses": _errors(404, 503),
}
_READY_DOCS: dict[str, Any] = {
    "summary": "Whether a model is ready",
    "tags": [INFERENCE_PROTOCOL_TAG],
    "response_model": ModelReadiness,
    "responses": _errors(404, 503),
}


@router.get("/health/live", tags=[OPS_TAG], summary="Protocol liveness: the process answers")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get(
    READINESS_PATH.removeprefix(PROTOCOL_PREFIX),
    tags=[OPS_TAG],
    summary="Protocol readiness: the model is loaded and warmed up",
    responses={503: {"content": {"application/json": {}}, "description": "Not ready yet."}},
)
async def ready(request: Request) -> Response:
    registry: ModelRegistry | None = request.app.state.models
    engine = registry.engine_if_ready(registry.default_name) if registry is not None else None
    if engine is None:
        return JSONResponse({"ready": False, "error": "the model is still loading"}, status_code=503)
    return JSONResponse({"ready": True})


@router.get("", tags=[OPS_TAG], summary="Protocol server metadata", response_model=ServerMetadata)
async def server_metadata(request: Request) -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": request.app.version, "extensions": EXTENSIONS}


def _ready_model(request: Request, name: str, version: str | None) -> ProtocolModel:
    return find_model(request, name, version)[1]


@router.get("/models/{model_name}", **_METADATA_DOCS)
async def model_metadata(request: Request, model_name: str) -> dict[str, Any]:
    return _ready_model(request, model_name, None).metadata()


@router.get("/models/{model_name}/versions/{model_version}", **_METADATA_DOCS)
async def model_version_metadata(request: Request, model_name: str, model_version: str) -> dict[str, Any]:
    return _ready_model(request, model_name, model_version).metadata()


@router.get("/models/{model_name}/ready", **_READY_DOCS)
async def model_ready(request: Request, model_name: str) -> dict[str, Any]:
    return {"name": _ready_model(request, model_name, None).name, "ready": True}


@router.get("/models/{model_name}/versions/{model_version}/ready", **_READY_DOCS)
async def model_version_ready(request: Request, model_name: str, model_version: str) -> dict[str, Any]:
    return {"name": _ready_model(request, model_name, model_version).name, "ready": True}


@router.post("/models/{model_name}/infer", **_INFER_DOCS)
async def infer(request: Request, model_name: str) -> Response:
    return await _infer(request, model_name, None)


@router.post("/models/{model_name}/versions/{model_version}/infer", **_INFER_DOCS)
async def infer_version(request: Request, model_name: str, model_version: str) -> Response:
    return await _infer(request, model_name, model_version)


async def _infer(request: Request, model_name: str, model_version: str | None) -> Response:
    served, model = find_model(request, model_name, model_version)
    with serving(request, READINESS_PATH, served.name) as (engine, settings):
        body = decompress(
            await request.body(), request.headers.get("content-encoding"), settings.max_body_bytes
        )
        parsed = parse_infer_request(
            body,
            request.headers.get(HEADER_LENGTH_HEADER),
            [model.input],
            [output.name for output in model.outputs],
            settings.max_items_per_request,
        )
        results = await run_model(engine, model, parsed.inputs[model.input.name])
        chosen = [(output, results[output.name]) for output in parsed.outputs]
        content, header_length = infer_response(model.name, model.version, parsed.id, chosen)
        headers = {MODEL_VERSION_HEADER: engine.version_label}
        if header_length is None:
            return Response(content, media_type="application/json", headers=headers)
        headers[HEADER_LENGTH_HEADER] = str(header_length)
        return Response(content, media_type=BINARY_MEDIA_TYPE, headers=headers)


@router.post(
    "/repository/index",
    tags=[INFERENCE_PROTOCOL_TAG],
    summary="Every model of the repository, and its state",
    description="Each model appears as `<name>-encoder` and `<name>-decoder`; `state` is READY, LOADING, "
    "UNLOADING or UNAVAILABLE, with the reason.",
    response_model=list[RepositoryEntry],
    responses=_errors(413, 503),
)
async def repository_index(request: Request) -> list[dict[str, str]]:
    registry = model_registry(request, READINESS_PATH)
    entries = []
    for served in sorted(registry, key=lambda served: served.name):
        manifest = served.manifest
        for part in PARTS:
            entries.append(
                {
                    "name": f"{served.name}-{part}",
                    "version": manifest.version if manifest is not None else "",
                    "state": PROTOCOL_STATES[served.state],
                    "reason": served.reason,
                }
            )
    return entries


class RepositoryControlParameters(BaseModel):
    """Triton's parameters that mean something here: `unload_dependents` (tritonclient sends it with every
    unload; no model here has dependents). A model's configuration is its manifest, so `config` is refused."""

    model_config = ConfigDict(extra="forbid")

    unload_dependents: bool = False


class RepositoryControlRequest(BaseModel):
    """Triton's load and unload body."""

    model_config = ConfigDict(extra="forbid")

    parameters: RepositoryControlParameters = Field(default_factory=RepositoryControlParameters)


# The body's schema with the parameters inline (a schema's own `$defs` do not resolve in OpenAPI).
_REPOSITORY_CONTROL_SCHEMA = RepositoryControlRequest.model_json_schema()
_REPOSITORY_CONTROL_SCHEMA["properties"]["parameters"] = _REPOSITORY_CONTROL_SCHEMA.pop("$defs")[
    RepositoryControlParameters.__name__
]
_CONTROL_DOCS: dict[str, Any] = {
    "tags": [INFERENCE_PROTOCOL_TAG, ADMIN_TAG],
    "responses": {
        **_errors(400, 404, 413, 503, 504),
        409: {
            "content": {"application/json": {"schema": ProtocolError.model_json_schema()}},
            "description": "Another load, unload or reload is running, or the default model cannot be "
            "unloaded.",
        },
    },
    "openapi_extra": {
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": _REPOSITORY_CONTROL_SCHEMA}},
        }
    },
}


async def _repository_control(request: Request, model_name: str) -> tuple[ModelControl, str]:
    """The model control and the repository model the path names (either part's name works too); the body
    is empty, or Triton's with no parameter but `unload_dependents`."""
    body = await request.body()
    if body.strip():
        try:
            RepositoryControlRequest.model_validate_json(body)
        except ValidationError:
            raise BadRequest(
                "load and unload take no parameters but unload_dependents here (a model's configuration is "
                "its manifest): send an empty body or {}"
            ) from None
    registry = model_registry(request, READINESS_PATH)
    try:
        name = repository_model(registry, model_name).name
    except UnknownModel:
        if request.url.path.endswith("/unload"):
            raise
        name = registry.discover(model_name).name  # a folder added to the repository since the start
    return request.app.state.control, name


@router.post(
    "/repository/models/{model_name}/load",
    summary="Load a model of the repository (or load it again), on every worker",
    description="The model's folder is read, verified and warmed up while the other models keep serving; "
    "a failure changes nothing. Takes the model's name, or either part's.",
    **_CONTROL_DOCS,
)
async def repository_load(request: Request, model_name: str) -> dict[str, Any]:
    control, name = await _repository_control(request, model_name)
    try:
        await control.load(name)
    except ReloadFailed as error:  # the protocol's status for a model that cannot load (Triton's too)
        raise BadRequest(error.detail) from None
    return {}


@router.post(
    "/repository/models/{model_name}/unload",
    summary="Unload a model of the repository, on every worker",
    description="New requests for the model get 503 at once; those in flight finish, then its memory is "
    "given back. The default model cannot be unloaded.",
    **_CONTROL_DOCS,
)
async def repository_unload(request: Request, model_name: str) -> dict[str, Any]:
    control, name = await _repository_control(request, model_name)
    await control.unload(name)
    return {}
