"""A typed Python client for vae-service (httpx; sync and async), and the `vae-client` command.

Imports neither FastAPI nor onnxruntime: at run time it needs httpx, numpy and Pillow only (`pip install
'vae-service[client]'` adds httpx, and tqdm for `vae-client`). Results are numpy arrays and PIL images;
error answers become `ServiceError` subclasses carrying the problem's status, title and detail.
"""

from app.client.api import (
    AsyncVaeClient,
    Encoding,
    Frames,
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
    "NotFound",
    "PayloadTooLarge",
    "Samples",
    "Scores",
    "ServiceError",
    "ServiceUnavailable",
    "Unauthorized",
    "UnsupportedMediaType",
    "VaeClient",
    "to_pil",
]
