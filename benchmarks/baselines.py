"""The baselines the service is measured against.

- HTTP ceiling: FastAPI doing no work: takes the same multipart upload and returns fixed JSON bytes, the
  service's own /encode response (captured from the service in the same run).
- Naive service: what a user writes first: plain `def` endpoints (FastAPI runs them in its thread pool),
  PIL decode, one onnxruntime `session.run` per request, JSON responses.
- Inference ceiling: the same ONNX model through onnxruntime with no HTTP, at the service's batch sizes,
  plus the service's own PNG encoding that every image response needs (`inference_images_per_second`).

The two apps run as separate processes with the service's uvicorn settings: `python -m benchmarks.baselines
{http-ceiling,naive} --port P ...`.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.responses import Response
from PIL import Image
from pydantic import BaseModel

from app.images import encode_png_grid, encode_pngs
from app.main import FASTAPI_TELEMETRY
from app.server.process import tune_interpreter
from benchmarks.scenarios import PROTOCOL_BATCH, SCORE_SAMPLES
from model.manifest import load_model_dir
from model.scores import posterior_draws, score_images


def create_http_ceiling_app(encode_response: bytes) -> FastAPI:
    """/encode reads the uploaded file and returns `encode_response` as is; /readyz for start-up timing.

    FastAPI is configured as the service configures it (its OpenTelemetry hooks off).
    """
    app = FastAPI(telemetry=FASTAPI_TELEMETRY)

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/encode")
    async def encode(file: UploadFile = File(...)) -> Response:
        await file.read()
        return Response(content=encode_response, media_type="application/json")

    return app


def to_png(image: np.ndarray) -> bytes:
    """PNG bytes of one (H, W) float image in [0, 1]."""
    buffer = io.BytesIO()
    Image.fromarray((np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8), mode="L").save(buffer, "PNG")
    return buffer.getvalue()


def grid_png(images: np.ndarray) -> bytes:
    """One PNG of (N, 1, H, W) images tiled into a near-square grid."""
    count, _, height, width = images.shape
    columns = int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / columns))
    grid = np.zeros((rows * height, columns * width), dtype=np.float32)
    for index, image in enumerate(images[:, 0]):
        row, column = divmod(index, columns)
        grid[row * height : (row + 1) * height, column * width : (column + 1) * width] = image
    return to_png(grid)


class _Latents(BaseModel):
    latents: list[list[float]]


class _Interpolation(BaseModel):
    start: list[float]
    end: list[float]
    steps: int = 8


def create_naive_app(model_dir: Path) -> FastAPI:
    """The straightforward service: one onnxruntime run per request, no batching."""
    manifest, paths = load_model_dir(model_dir)
    encoder = ort.InferenceSession(str(paths["encoder"]), providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(paths["decoder"]), providers=["CPUExecutionProvider"])
    names = manifest.tensors
    app = FastAPI()

    def images_response(latents: np.ndarray) -> dict[str, list[str]]:
        images = decoder.run([names.decoder_output], {names.decoder_input: latents.astype(np.float32)})[0]
        return {"images": [base64.b64encode(to_png(image[0])).decode() for image in images]}

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/encode")
    def encode(file: UploadFile = File(...)) -> dict[str, list[float]]:
        image = Image.open(io.BytesIO(file.file.read())).convert("L")
        pixels = np.asarray(image, dtype=np.float32)[None, None] / 255.0
        mean, log_var = encoder.run(
            [names.encoder_mean, names.encoder_log_var], {names.encoder_input: pixels}
        )
        return {"mean": mean[0].tolist(), "log_var": log_var[0].tolist()}

    @app.get("/sample", response_model=None)
    def sample(request: Request, n: int = 16) -> dict[str, list[str]] | Response:
        latents = np.random.default_rng().standard_normal((n, manifest.latent_dim))
        if "image/png" in request.headers.get("accept", ""):
            images = decoder.run([names.decoder_output], {names.decoder_input: latents.astype(np.float32)})[0]
            return Response(content=grid_png(images), media_type="image/png")
        return images_response(latents)

    @app.post("/decode")
    def decode(body: _Latents) -> dict[str, list[str]]:
        return images_response(np.asarray(body.latents))

    @app.post("/interpolate")
    def interpolate(body: _Interpolation) -> dict[str, list[str]]:
        weights = np.linspace(0.0, 1.0, body.steps)[:, None]
        return images_response((1 - weights) * np.asarray(body.start) + weights * np.asarray(body.end))

    return app


def _inference_work(
    model_dir: Path, scenario_name: str, max_batch_size: int, intra_op_threads: int
) -> tuple[Callable[[], None], int]:
    """The model work behind one service response (or one full batch for /encode) and its image count."""
    manifest, paths = load_model_dir(model_dir)
    names = manifest.tensors
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads  # 0: onnxruntime's default, one thread per core
    rng = np.random.default_rng(0)
    if scenario_name in ("encode", "oip-binary", "oip-json"):
        # /encode: one full batch; the protocol's requests: the encoder on their own batch.
        batch = max_batch_size if scenario_name == "encode" else PROTOCOL_BATCH
        encoder = ort.InferenceSession(str(paths["encoder"]), options, providers=["CPUExecutionProvider"])
        images = rng.random((batch, *manifest.image.shape), dtype=np.float32)

        def encode_batch() -> None:
            encoder.run(None, {names.encoder_input: images})

        return encode_batch, batch

    decoder = ort.InferenceSession(str(paths["decoder"]), options, providers=["CPUExecutionProvider"])
    if scenario_name == "score":
        # Scoring max_batch_size images at k=16: one encoder run, their k + 1 latents each (the draws and
        # the mean) in full decoder batches with all outputs fetched, then the service's own score arithmetic
        # (model/scores.py), as image scenarios include the service's PNG encoding.
        encoder = ort.InferenceSession(str(paths["encoder"]), options, providers=["CPUExecutionProvider"])
        images = rng.random((max_batch_size, *manifest.image.shape), dtype=np.float32)

        def score_batch() -> None:
            mean, log_var = encoder.run(None, {names.encoder_input: images})
            eps = rng.standard_normal((SCORE_SAMPLES, max_batch_size, manifest.latent_dim))
            latents = np.concatenate(
                [
                    posterior_draws(mean, log_var, eps).astype(np.float32).reshape(-1, manifest.latent_dim),
                    mean,
                ]
            )
            outputs = [
                decoder.run(None, {names.decoder_input: latents[start : start + max_batch_size]})
                for start in range(0, len(latents), max_batch_size)
            ]
            decoded = np.concatenate([output[0] for output in outputs])
            logits = np.concatenate([output[-1] for output in outputs])
            draws = SCORE_SAMPLES * max_batch_size
            score_images(
                images,
                mean,
                log_var,
                eps,
                logits[:draws],
                decoded[draws:],
                likelihood=manifest.likelihood,
                draw_logits_given=len(outputs[0]) > 1,
                observation_std=manifest.observation_std,
            )

        return score_batch, max_batch_size

    traverse_frames = 7 * min(8, manifest.latent_dim)
    count = {"sample-json": 16, "sample-png": 16, "sample-gmm": 16, "interpolate": 8, "decode": 64}.get(
        scenario_name, traverse_frames
    )
    latents = rng.standard_normal((count, manifest.latent_dim)).astype(np.float32)

    def decode_and_encode_pngs() -> None:
        images = decoder.run([names.decoder_output], {names.decoder_input: latents})[0]
        if scenario_name in ("sample-png", "traverse"):
            encode_png_grid(images)
        else:
            encode_pngs(images)

    return decode_and_encode_pngs, count


def _calls_per_second(work: Callable[[], None], callers: int, duration_seconds: float) -> float:
    """Calls/s of `work` from `callers` threads at once (onnxruntime releases the GIL while it runs)."""
    deadline = time.perf_counter() + duration_seconds
    counts = [0] * callers

    def call_until_deadline(caller: int) -> None:
        while time.perf_counter() < deadline:
            work()
            counts[caller] += 1

    threads = [threading.Thread(target=call_until_deadline, args=(caller,)) for caller in range(callers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def inference_images_per_second(
    model_dir: Path, scenario_name: str, max_batch_size: int, duration_seconds: float
) -> dict[str, float]:
    """Images/s of a scenario's model work in this process, no HTTP, in two layouts; the ceiling is the best.

    "sequential": one caller, onnxruntime's default thread pool (as a service with one worker would run it);
    "per_core": one caller per usable core, one onnxruntime thread each (PNG encoding overlaps inference).
    """
    cores = len(os.sched_getaffinity(0))
    results = {}
    for layout, callers, intra_op_threads in (("sequential", 1, 0), ("per_core", cores, 1)):
        work, images_per_call = _inference_work(model_dir, scenario_name, max_batch_size, intra_op_threads)
        for _ in range(3):
            work()
        results[layout] = _calls_per_second(work, callers, duration_seconds / 2) * images_per_call
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="Run one baseline server on 127.0.0.1.")
    parser.add_argument("kind", choices=["http-ceiling", "naive"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--log-level", default="info", help="the service's VAE_LOG_LEVEL, so logging costs the same"
    )
    parser.add_argument("--model-dir", type=Path, help="naive: the model directory to serve")
    parser.add_argument(
        "--access-log", action="store_true", help="the service's VAE_ACCESS_LOG: one log line per request"
    )
    parser.add_argument(
        "--encode-response", type=Path, help="http-ceiling: file with the /encode JSON to return"
    )
    args = parser.parse_args()
    if args.kind == "http-ceiling":
        app = create_http_ceiling_app(args.encode_response.read_bytes())
        tune_interpreter()  # the service's process settings, so the ceiling bounds it fairly
    else:
        app = create_naive_app(args.model_dir)
    # The service's own call (app/cli.py): uvicorn's defaults (uvloop, httptools), one worker.
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
        workers=1,
    )


if __name__ == "__main__":
    main()
