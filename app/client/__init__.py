"""A typed Python client for vae-service (httpx; sync and async), and the `vae-client` command.

Imports neither FastAPI nor onnxruntime: at run time it needs httpx, numpy and Pillow only (`pip install
'vae-service[client]'` adds httpx, and tqdm for `vae-client`). Results are numpy arrays and PIL images;
error answers become `ServiceError` subclasses carrying the problem's status, title and detail.

A server may serve several models: `VaeClient(url, model="mnist-ae")` (or `client.for_model("mnist-ae")`)
calls that one under /models/mnist-ae/..., without a model the server's default; `client.models()` lists
them; a name the server does not serve raises `UnknownModel`.
"""

from app.client.api import (
    AsyncVaeClient,
    Encoding,
    Frames,
    LatentMap,
    ModelSummary,
    Samples,
    Scores,
    VaeClient,
    to_pil,
)
from app.client.errors import (
    BadRequest,
    Conflict,
    DeadlineExceeded,
    Forbidden,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    ServiceUnavailable,
    Unauthorized,
    UnknownModel,
    UnsupportedMediaType,
)

__all__ = [
    "AsyncVaeClient",
    "BadRequest",
    "Conflict",
    "DeadlineExceeded",
    "Encoding",
    "Forbidden",
    "Frames",
    "InvalidInput",
    "LatentMap",
    "ModelSummary",
    "NotFound",
    "PayloadTooLarge",
    "Samples",
    "Scores",
    "ServiceError",
    "ServiceUnavailable",
    "Unauthorized",
    "UnknownModel",
    "UnsupportedMediaType",
    "VaeClient",
    "to_pil",
]
