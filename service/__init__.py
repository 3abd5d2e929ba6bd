"""The VAE inference service (FastAPI on ONNX Runtime). Never imports torch."""

import os

# ONNX Runtime (1.31) records usage telemetry in a database under $HOME/.cache/Microsoft and sends it to
# Microsoft's collector, unless this is set before it is imported; where HOME is not writable (the image's
# read-only root) it logs a plain-text warning at every start instead. An inference service sends nothing
# anywhere of its own accord. Set ORT_DISABLE_TELEMETRY=0 in the environment to leave ONNX Runtime's default.
if not os.environ.get("ORT_DISABLE_TELEMETRY"):  # unset or empty (ONNX Runtime reads empty as unset)
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"
