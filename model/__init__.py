"""Offline model code: the VAE, its ONNX export, and the torch-free manifest schema."""
