"""The VAE inference service (FastAPI on ONNX Runtime). Never imports torch."""
