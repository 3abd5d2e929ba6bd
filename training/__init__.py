"""Train, evaluate and export a VAE (PyTorch). Never imported by the service."""

import os

# ONNX Runtime checks each export; as in the service (service/__init__.py), without its usage telemetry.
if not os.environ.get("ORT_DISABLE_TELEMETRY"):
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"
