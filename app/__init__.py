"""The HTTP service: FastAPI on onnxruntime. Never imports torch."""
