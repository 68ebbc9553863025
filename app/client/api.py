"""`VaeClient` and `AsyncVaeClient`: every VAE endpoint as a method returning numpy arrays or PIL images.

Each method builds a `Call` (the request, and how to read its answer) with a plain function below; the two
clients differ only in how they send it. Images are (N, C, H, W) float32 in [0, 1]; latents (N, L) float32.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar

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
class Call(Generic[T]):
    """One request and the function that reads its successful answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, Any] = field(default_factory=dict)
    json: Any = None
    files: Files | None = None
    data: dict[str, str] | None = None  # text fields beside `files`
    accept: str = "application/json"


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


def model_call() -> Call[dict[str, Any]]:
    return Call("GET", "/model", _json)


def encode_call(images: ImageLike | Sequence[ImageLike], sample: bool, seed: int | None) -> Call[Encoding]:
    params = _params(sample=sample or None, seed=seed)
    return Call("POST", "/encode", _encoding, params, files=_uploads(images))


def decode_call(latents: np.ndarray | Sequence[Sequence[float]]) -> Call[np.ndarray]:
    rows = np.atleast_2d(np.asarray(latents, np.float64)).tolist()
    return Call("POST", "/decode", _images, {"format": "array"}, json={"latents": rows})


def sample_call(
    n: int, seed: int | None, temperature: float, prior: str | None, label: str | None
) -> Call[Samples]:
    params = _params(n=n, seed=seed, temperature=temperature, prior=prior, label=label, format="array")
    return Call("GET", "/sample", _samples, params)


def sample_grid_call(
    n: int,
    seed: int | None,
    temperature: float,
    prior: str | None,
    label: str | None,
    columns: int | None,
) -> Call[Image.Image]:
    params = _params(n=n, seed=seed, temperature=temperature, prior=prior, label=label, columns=columns)
    return Call("GET", "/sample", _picture, params, accept="image/png")


def reconstruct_call(
    images: ImageLike | Sequence[ImageLike], sample: bool, seed: int | None
) -> Call[np.ndarray]:
    params = _params(format="array", sample=sample or None, seed=seed)
    return Call("POST", "/reconstruct", _images, params, files=_uploads(images))


def interpolate_call(
    start: ImageLike | Sequence[float], end: ImageLike | Sequence[float], steps: int, method: str
) -> Call[Frames]:
    params = {"format": "array"}
    if _is_latent(start) and _is_latent(end):
        body = {"start": _latent(start), "end": _latent(end), "steps": steps, "method": method}
        return Call("POST", "/interpolate", _frames, params, json=body)
    if _is_latent(start) or _is_latent(end):
        raise ValueError("interpolate takes two latent vectors or two images, not one of each")
    files = _uploads(start, "start") + _uploads(end, "end")  # type: ignore[arg-type]
    return Call(
        "POST", "/interpolate", _frames, params, files=files, data={"steps": str(steps), "method": method}
    )


def _subject_call(path: str, subject: ImageLike | Sequence[float], params: dict[str, Any]) -> Call[Frames]:
    """A traversal or an edit of a latent vector (sent as JSON) or of an image (uploaded)."""
    params = {**params, "format": "array"}
    if _is_latent(subject):
        return Call("POST", path, _frames, params, json={"latent": _latent(subject)})
    return Call("POST", path, _frames, params, files=_uploads(subject, "file"))  # type: ignore[arg-type]


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
    return Call("POST", "/score", _scores, _params(k=k, seed=seed, alpha=alpha), files=_uploads(images))


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
    """A blocking client. `api_key` is sent as `Authorization: Bearer`; `timeout` is per request, seconds.

    >>> with VaeClient("http://127.0.0.1:8000") as client:
    ...     grid = client.sample_grid(16, seed=0)
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(base_url=base_url, transport=transport, **_http_options(api_key, timeout))

    def __enter__(self) -> VaeClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def send(self, call: Call[T]) -> T:
        """Send one call; raise its ServiceError for an error answer."""
        response = self._http.request(call.method, call.path, **_request_options(call))
        raise_for_problem(response)
        return call.parse(response)

    def model(self) -> dict[str, Any]:
        """GET /model: the manifest, provider, batching, limits, latent space and scores."""
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


class AsyncVaeClient:
    """The same methods as VaeClient, as coroutines (`async with AsyncVaeClient(...) as client`)."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url, transport=transport, **_http_options(api_key, timeout)
        )

    async def __aenter__(self) -> AsyncVaeClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(self, call: Call[T]) -> T:
        response = await self._http.request(call.method, call.path, **_request_options(call))
        raise_for_problem(response)
        return call.parse(response)

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
