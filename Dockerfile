# The vae-service image: the REST service on onnxruntime, serving the shipped MNIST model by default.
# No torch here: the builder turns the project into a wheel and the runtime installs it WITHOUT extras.
# tests/deploy/test_service_image.py builds this file unchanged (on a local base image) and runs the container.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY model ./model
COPY training ./training
# The project's own wheel only (model/default is package data inside it); dependencies resolve at install time.
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VAE_HOST=0.0.0.0 \
    VAE_PORT=8000
RUN groupadd --gid 10001 vae \
    && useradd --create-home --uid 10001 --gid vae --shell /usr/sbin/nologin vae \
    && install -d -o vae -g vae /models
COPY --from=builder /wheels /wheels
RUN python -m pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels
USER 10001:10001
WORKDIR /home/vae
EXPOSE 8000
# Liveness only (/healthz); readiness (/readyz) is for load balancers. slim has no curl, so urllib it is.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('VAE_PORT', '8000') + '/healthz', timeout=2)"]
# Serves the models inside the wheel; set VAE_MODEL_REPOSITORY=/models (or VAE_MODEL_DIR) to serve mounted ones.
CMD ["vae-serve"]
