"""`VaeClient` and `AsyncVaeClient`: every VAE endpoint as a method returning numpy arrays or PIL images.

Each method builds a `Call` (the request, and how to read its answer) with a plain function below; the two
clients differ only in how they send it. Images are (N, C, H, W) float32 in [0, 1]; latents (N, L) float32.
A client made with `model="name"` sends every model call to `/models/name/...`; without one, to the
unprefixed routes, which serve the server's default model. `models()` lists what the server serves.
"""

from __future__ import annotations

import copy
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import quote

import httpx
import numpy as np
from PIL import Image

from app.client.errors import raise_for_problem

DEFAULT_URL = "http://127.0.0.1:8000"
T = TypeVar("T")
# An image to upload: a file path, encoded bytes (PNG, JPEG, ...), a PIL image, or an array: (H, W) or
# (C, H, W) with C 1 or 3, floats in [0, 1] or uint8.
ImageLike = str | os.PathLike[str] | bytes | Image.Image | np.ndarray
Files = list[tuple[str, tuple[str, bytes, str]]]


@dataclass(frozen=True)
class Encoding:
    """Posteriors of N images: mean, log_var and std (N, L), and z (N, L) when sampled, with its seed."""

    mean: np.ndarray
    log_var: np.ndarray
    std: np.ndarray
    z: np.ndarray | None
    seed: int | None


@dataclass(frozen=True)
class Samples:
    """Decoded samples (N, C, H, W) and how they were drawn."""

    images: np.ndarray
    seed: int
    prior: str
    temperature: float
    label: str | None


@dataclass(frozen=True)
class Frames:
    """Decoded frames (N, C, H, W), their latents (N, L), and what the endpoint says about them (dims,
    span and steps for a traversal; amounts and the attribute or labels for an edit; method for an
    interpolation)."""

    images: np.ndarray
    latents: np.ndarray
    details: dict[str, Any]


@dataclass(frozen=True)
class Scores:
    """Per image: negative_elbo, iwae, reconstruction_mse, latent_nll, percentile, p_value, anomalous..."""

    items: list[dict[str, Any]]
    k: int
    seed: int
    alpha: float
    note: str | None


@dataclass(frozen=True)
class LatentMap:
    """The test split's codes on a 2-D map: points (T, 2), labels (T,) indexing label_names (-1 without
    labels), and the projection: point = components (2, L) @ (code - mean (L,))."""

    points: np.ndarray
    labels: np.ndarray
    label_names: list[str]
    mean: np.ndarray
    components: np.ndarray


@dataclass(frozen=True)
class ModelSummary:
    """One served model as GET /models lists it. `kind` is "vae", "ae" or "pca"; `state` is "ready",
    "loading", "unloading" or "unavailable", with the `reason` when it is not ready; `memory_bytes` is None
    where the server cannot tell."""

    name: str
    default: bool
    version: str
    kind: str
    state: str
    reason: str
    latent_shape: tuple[int, ...]
    image_shape: tuple[int, ...]
    memory_bytes: int | None


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request and the function that reads its successful answer. A `per_model` call is a model
    endpoint: a client that names a model sends it under /models/{model} (see `model_path`)."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, Any] = field(default_factory=dict)
    json: Any = None
    files: Files | None = None
    data: dict[str, str] | None = None  # text fields beside `files`
    accept: str = "application/json"
    per_model: bool = False


def model_path(model: str | None, path: str) -> str:
    """Where a model endpoint's `path` ("/encode", ...) is for `model`: under /models/{model}, or as it is
    (the server's default model) when `model` is None. GET /model becomes GET /models/{model}."""
    if model is None:
        return path
    prefix = f"/models/{quote(model, safe='')}"
    return prefix if path == "/model" else prefix + path


def to_pil(image: np.ndarray) -> Image.Image:
    """(C, H, W), (H, W, C) with C 1 or 3, or (H, W); floats in [0, 1] or uint8 -> a PIL image ("L" or
    "RGB"). ValueError for any other shape: a batch of images is 4-D, (N, C, H, W)."""
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] in (1, 3):
        array = array[..., 0] if array.shape[-1] == 1 else array
    elif array.ndim != 2:
        raise ValueError(
            f"an image array is (C, H, W), (H, W, C) with C 1 or 3, or (H, W); got shape {array.shape} "
            "(a batch of images is (N, C, H, W))"
        )
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def image_bytes(image: ImageLike) -> bytes:
    """The bytes to upload for one image."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, str | os.PathLike):
        return Path(image).read_bytes()
    picture = image if isinstance(image, Image.Image) else to_pil(image)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _many(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    if isinstance(images, list | tuple):
        return list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    return [images]  # type: ignore[list-item]


def _uploads(images: ImageLike | Sequence[ImageLike], field_name: str = "files") -> Files:
    return [
        (field_name, (f"image-{index}.png", image_bytes(image), "application/octet-stream"))
        for index, image in enumerate(_many(images))
    ]


def _is_latent(value: object) -> bool:
    return isinstance(value, list | tuple) or (isinstance(value, np.ndarray) and value.ndim == 1)


def _latent(value: Any) -> list[float]:
    return [float(number) for number in value]


def _params(**values: Any) -> dict[str, Any]:
    """Query parameters that are set; lists as comma-separated text, booleans as true/false."""
    params: dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, list | tuple):
            value = ",".join(str(item) for item in value)
        params[name] = value
    return params


def _arrays(response: httpx.Response) -> tuple[np.ndarray, dict[str, Any]]:
    body = response.json()
    return np.asarray(body.pop("images"), np.float32), body


def _images(response: httpx.Response) -> np.ndarray:
    return _arrays(response)[0]


def _frames(response: httpx.Response) -> Frames:
    images, details = _arrays(response)
    return Frames(images, np.asarray(details.pop("latents"), np.float32), details)


def _picture(response: httpx.Response) -> Image.Image:
    picture = Image.open(io.BytesIO(response.content))
    picture.load()
    return picture


def _json(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()
    return body


def _encoding(response: httpx.Response) -> Encoding:
    body = response.json()
    items = body["items"]

    def stacked(name: str) -> np.ndarray:
        return np.asarray([item[name] for item in items], np.float32)

    z = stacked("z") if items and "z" in items[0] else None
    return Encoding(stacked("mean"), stacked("log_var"), stacked("std"), z, body["seed"])


def _samples(response: httpx.Response) -> Samples:
    images, body = _arrays(response)
    return Samples(images, body["seed"], body["prior"], body["temperature"], body.get("label"))


def _scores(response: httpx.Response) -> Scores:
    body = response.json()
    return Scores(body["items"], body["k"], body["seed"], body["alpha"], body.get("note"))


def _latent_map(response: httpx.Response) -> LatentMap:
    body = response.json()
    return LatentMap(
        np.asarray(body["points"], np.float32).reshape(-1, 2),
        np.asarray(body["labels"], np.int64),
        body["label_names"],
        np.asarray(body["mean"], np.float32),
        np.asarray(body["components"], np.float32),
    )


def _model_summaries(response: httpx.Response) -> list[ModelSummary]:
    return [
        ModelSummary(
            name=entry["name"],
            default=entry["default"],
            version=entry["version"],
            kind=entry["kind"],
            state=entry["state"],
            reason=entry["reason"],
            latent_shape=tuple(entry["latent_shape"]),
            image_shape=tuple(entry["image_shape"]),
            memory_bytes=entry["memory_bytes"],
        )
        for entry in response.json()["models"]
    ]


def models_call() -> Call[list[ModelSummary]]:
    return Call("GET", "/models", _model_summaries)


def model_call() -> Call[dict[str, Any]]:
    return Call("GET", "/model", _json, per_model=True)


def encode_call(images: ImageLike | Sequence[ImageLike], sample: bool, seed: int | None) -> Call[Encoding]:
    params = _params(sample=sample or None, seed=seed)
    return Call("POST", "/encode", _encoding, params, files=_uploads(images), per_model=True)


def decode_call(latents: np.ndarray | Sequence[Sequence[float]]) -> Call[np.ndarray]:
    rows = np.atleast_2d(np.asarray(latents, np.float64)).tolist()
    return Call("POST", "/decode", _images, {"format": "array"}, json={"latents": rows}, per_model=True)


def sample_call(
    n: int, seed: int | None, temperature: float, prior: str | None, label: str | None
) -> Call[Samples]:
    params = _params(n=n, seed=seed, temperature=temperature, prior=prior, label=label, format="array")
    return Call("GET", "/sample", _samples, params, per_model=True)


def sample_grid_call(
    n: int,
    seed: int | None,
    temperature: float,
    prior: str | None,
    label: str | None,
    columns: int | None,
) -> Call[Image.Image]:
    params = _params(n=n, seed=seed, temperature=temperature, prior=prior, label=label, columns=columns)
    return Call("GET", "/sample", _picture, params, accept="image/png", per_model=True)


def reconstruct_call(
    images: ImageLike | Sequence[ImageLike], sample: bool, seed: int | None
) -> Call[np.ndarray]:
    params = _params(format="array", sample=sample or None, seed=seed)
    return Call("POST", "/reconstruct", _images, params, files=_uploads(images), per_model=True)


def interpolate_call(
    start: ImageLike | Sequence[float], end: ImageLike | Sequence[float], steps: int, method: str
) -> Call[Frames]:
    params = {"format": "array"}
    if _is_latent(start) and _is_latent(end):
        body = {"start": _latent(start), "end": _latent(end), "steps": steps, "method": method}
        return Call("POST", "/interpolate", _frames, params, json=body, per_model=True)
    if _is_latent(start) or _is_latent(end):
        raise ValueError("interpolate takes two latent vectors or two images, not one of each")
    files = _uploads(start, "start") + _uploads(end, "end")  # type: ignore[arg-type]
    data = {"steps": str(steps), "method": method}
    return Call("POST", "/interpolate", _frames, params, files=files, data=data, per_model=True)


def _subject_call(path: str, subject: ImageLike | Sequence[float], params: dict[str, Any]) -> Call[Frames]:
    """A traversal or an edit of a latent vector (sent as JSON) or of an image (uploaded)."""
    params = {**params, "format": "array"}
    if _is_latent(subject):
        return Call("POST", path, _frames, params, json={"latent": _latent(subject)}, per_model=True)
    files = _uploads(subject, "file")  # type: ignore[arg-type]
    return Call("POST", path, _frames, params, files=files, per_model=True)


def traverse_call(
    subject: ImageLike | Sequence[float], dims: Sequence[int] | None, span: float | None, steps: int | None
) -> Call[Frames]:
    return _subject_call("/traverse", subject, _params(dims=dims, span=span, steps=steps))


def edit_call(
    subject: ImageLike | Sequence[float],
    attribute: str | None,
    to_label: str | None,
    from_label: str | None,
    amounts: Sequence[float] | None,
) -> Call[Frames]:
    params = _params(attribute=attribute, to_label=to_label, from_label=from_label, amounts=amounts)
    return _subject_call("/edit", subject, params)


def score_call(
    images: ImageLike | Sequence[ImageLike], k: int | None, seed: int | None, alpha: float | None
) -> Call[Scores]:
    params = _params(k=k, seed=seed, alpha=alpha)
    return Call("POST", "/score", _scores, params, files=_uploads(images), per_model=True)


def latent_map_call() -> Call[LatentMap]:
    return Call("GET", "/latent-map", _latent_map, per_model=True)


def _http_options(api_key: str | None, timeout: float) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return {"headers": headers, "timeout": timeout}


def _request_options(call: Call[Any]) -> dict[str, Any]:
    return {
        "params": call.params,
        "json": call.json,
        "files": call.files,
        "data": call.data,
        "headers": {"Accept": call.accept},
    }


class VaeClient:
    """A blocking client. `api_key` is sent as `Authorization: Bearer`; `timeout` is per request, seconds;
    `model` names the served model to call (None: the server's default model).

    >>> with VaeClient("http://127.0.0.1:8000", model="mnist-ae") as client:
    ...     grid = client.sample_grid(16, seed=0)
    ...     pca_latents = client.for_model("mnist-pca").encode("digit.png").mean
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        model: str | None = None,
    ) -> None:
        self._http = httpx.Client(base_url=base_url, transport=transport, **_http_options(api_key, timeout))
        self.model_name = model

    def for_model(self, model: str | None) -> VaeClient:
        """A client for another model (None: the default one) on this client's connections; closing
        either closes both."""
        other = copy.copy(self)
        other.model_name = model
        return other

    def __enter__(self) -> VaeClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def send(self, call: Call[T]) -> T:
        """Send one call (a model endpoint to this client's model); raise its ServiceError for an error
        answer: UnknownModel when the server has no such model."""
        path = model_path(self.model_name, call.path) if call.per_model else call.path
        response = self._http.request(call.method, path, **_request_options(call))
        raise_for_problem(response)
        return call.parse(response)

    def models(self) -> list[ModelSummary]:
        """GET /models: every model the server serves, by name, with its state."""
        return self.send(models_call())

    def model(self) -> dict[str, Any]:
        """GET /model (or /models/{model}): the manifest, provider, batching, limits, latent space and
        scores."""
        return self.send(model_call())

    def encode(
        self, images: ImageLike | Sequence[ImageLike], *, sample: bool = False, seed: int | None = None
    ) -> Encoding:
        return self.send(encode_call(images, sample, seed))

    def decode(self, latents: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        return self.send(decode_call(latents))

    def sample(
        self,
        n: int = 16,
        *,
        seed: int | None = None,
        temperature: float = 1.0,
        prior: str | None = None,
        label: str | None = None,
    ) -> Samples:
        return self.send(sample_call(n, seed, temperature, prior, label))

    def sample_grid(
        self,
        n: int = 16,
        *,
        seed: int | None = None,
        temperature: float = 1.0,
        prior: str | None = None,
        label: str | None = None,
        columns: int | None = None,
    ) -> Image.Image:
        return self.send(sample_grid_call(n, seed, temperature, prior, label, columns))

    def reconstruct(
        self, images: ImageLike | Sequence[ImageLike], *, sample: bool = False, seed: int | None = None
    ) -> np.ndarray:
        return self.send(reconstruct_call(images, sample, seed))

    def interpolate(
        self,
        start: ImageLike | Sequence[float],
        end: ImageLike | Sequence[float],
        *,
        steps: int = 8,
        method: Literal["linear", "slerp"] = "linear",
    ) -> Frames:
        return self.send(interpolate_call(start, end, steps, method))

    def traverse(
        self,
        subject: ImageLike | Sequence[float],
        *,
        dims: Sequence[int] | None = None,
        span: float | None = None,
        steps: int | None = None,
    ) -> Frames:
        return self.send(traverse_call(subject, dims, span, steps))

    def edit(
        self,
        subject: ImageLike | Sequence[float],
        *,
        attribute: str | None = None,
        to_label: str | None = None,
        from_label: str | None = None,
        amounts: Sequence[float] | None = None,
    ) -> Frames:
        return self.send(edit_call(subject, attribute, to_label, from_label, amounts))

    def score(
        self,
        images: ImageLike | Sequence[ImageLike],
        *,
        k: int | None = None,
        seed: int | None = None,
        alpha: float | None = None,
    ) -> Scores:
        return self.send(score_call(images, k, seed, alpha))

    def latent_map(self) -> LatentMap:
        """GET /latent-map: the test split's codes on the model's 2-D map, and the projection that made it."""
        return self.send(latent_map_call())


class AsyncVaeClient:
    """The same methods as VaeClient, as coroutines (`async with AsyncVaeClient(...) as client`); `model`
    and `for_model` as there."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        model: str | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url, transport=transport, **_http_options(api_key, timeout)
        )
        self.model_name = model

    def for_model(self, model: str | None) -> AsyncVaeClient:
        other = copy.copy(self)
        other.model_name = model
        return other

    async def __aenter__(self) -> AsyncVaeClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(self, call: Call[T]) -> T:
        path = model_path(self.model_name, call.path) if call.per_model else call.path
        response = await self._http.request(call.method, path, **_request_options(call))
        raise_for_problem(response)
        return call.parse(response)

    async def models(self) -> list[ModelSummary]:
        return await self.send(models_call())

    async def model(self) -> dict[str, Any]:
        return await self.send(model_call())

    async def encode(
        self, images: ImageLike | Sequence[ImageLike], *, sample: bool = False, seed: int | None = None
    ) -> Encoding:
        return await self.send(encode_call(images, sample, seed))

    async def decode(self, latents: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        return await self.send(decode_call(latents))

    async def sample(
        self,
        n: int = 16,
        *,
        seed: int | None = None,
        temperature: float = 1.0,
        prior: str | None = None,
        label: str | None = None,
    ) -> Samples:
        return await self.send(sample_call(n, seed, temperature, prior, label))

    async def sample_grid(
        self,
        n: int = 16,
        *,
        seed: int | None = None,
        temperature: float = 1.0,
        prior: str | None = None,
        label: str | None = None,
        columns: int | None = None,
    ) -> Image.Image:
        return await self.send(sample_grid_call(n, seed, temperature, prior, label, columns))

    async def reconstruct(
        self, images: ImageLike | Sequence[ImageLike], *, sample: bool = False, seed: int | None = None
    ) -> np.ndarray:
        return await self.send(reconstruct_call(images, sample, seed))

    async def interpolate(
        self,
        start: ImageLike | Sequence[float],
        end: ImageLike | Sequence[float],
        *,
        steps: int = 8,
        method: Literal["linear", "slerp"] = "linear",
    ) -> Frames:
        return await self.send(interpolate_call(start, end, steps, method))

    async def traverse(
        self,
        subject: ImageLike | Sequence[float],
        *,
        dims: Sequence[int] | None = None,
        span: float | None = None,
        steps: int | None = None,
    ) -> Frames:
        return await self.send(traverse_call(subject, dims, span, steps))

    async def edit(
        self,
        subject: ImageLike | Sequence[float],
        *,
        attribute: str | None = None,
        to_label: str | None = None,
        from_label: str | None = None,
        amounts: Sequence[float] | None = None,
    ) -> Frames:
        return await self.send(edit_call(subject, attribute, to_label, from_label, amounts))

    async def score(
        self,
        images: ImageLike | Sequence[ImageLike],
        *,
        k: int | None = None,
        seed: int | None = None,
        alpha: float | None = None,
    ) -> Scores:
        return await self.send(score_call(images, k, seed, alpha))

    async def latent_map(self) -> LatentMap:
        return await self.send(latent_map_call())
