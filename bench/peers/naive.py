"""The naive peer of `make bench`: the same VAE served the way FastAPI tutorials serve a PyTorch model.

PyTorch eager on the CPU, Pydantic response models of float lists, FastAPI's default JSON encoding, one
`def` handler per endpoint (FastAPI runs them in its thread pool). The weights are the served model's own:
the ONNX graphs' initializers, loaded into the training package's modules (their names are the modules'
state-dict keys), rebuilt from the architecture in the model card. Startup checks that this PyTorch model
gives the ONNX Runtime outputs, so the two servers compute the same thing.

    VAE_MODEL_DIR=models/default python -m uvicorn --factory bench.peers.naive:create_app --port 8001
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from fastapi import FastAPI, File, UploadFile
from onnx import numpy_helper
from PIL import Image
from pydantic import BaseModel

from training.model import Decoder, Encoder, VAEConfig

__all__ = ["create_app"]

# How far the PyTorch and ONNX Runtime outputs may differ: both are float32 with different kernels.
PARITY_ATOL = 1e-4


class Health(BaseModel):
    status: str = "ok"


class SampleOut(BaseModel):
    latents: list[list[float]]
    images: list[list[list[list[float]]]]


class DecodeIn(BaseModel):
    latents: list[list[float]]


class DecodeOut(BaseModel):
    images: list[list[list[list[float]]]]


class EncodeOut(BaseModel):
    mu: list[list[float]]
    logvar: list[list[float]]
    kl: list[float]


class KLIn(BaseModel):
    mu: list[float]
    logvar: list[float]


class KLOut(BaseModel):
    kl: float


def _load(model_dir: Path) -> tuple[Encoder, Decoder, VAEConfig]:
    card = json.loads((model_dir / "model.json").read_text())
    cfg = VAEConfig(**card["training"]["model"])
    encoder, decoder = Encoder(cfg), Decoder(cfg)
    for module, graph in ((encoder, "encoder"), (decoder, "decoder")):
        proto = onnx.load(str(model_dir / card[graph]["file"]))
        weights = {
            init.name: torch.from_numpy(numpy_helper.to_array(init).copy())
            for init in proto.graph.initializer
        }
        module.load_state_dict({name: weights[name] for name in module.state_dict()})
        module.eval()
    _check_parity(model_dir, card, encoder, decoder, cfg)
    return encoder, decoder, cfg


@torch.no_grad()
def _check_parity(
    model_dir: Path, card: dict[str, Any], encoder: Encoder, decoder: Decoder, cfg: VAEConfig
) -> None:
    x = np.random.default_rng(0).uniform(size=(4, cfg.channels, cfg.height, cfg.width)).astype(np.float32)
    z = np.random.default_rng(1).standard_normal((4, cfg.latent_dim)).astype(np.float32)
    cpu = ["CPUExecutionProvider"]
    onnx_encoder = ort.InferenceSession(str(model_dir / card["encoder"]["file"]), providers=cpu)
    onnx_decoder = ort.InferenceSession(str(model_dir / card["decoder"]["file"]), providers=cpu)
    mu, _ = onnx_encoder.run(None, {"x": x})
    (x_mean,) = onnx_decoder.run(["x_mean"], {"z": z})
    torch_mu, _ = encoder(torch.from_numpy(x))
    np.testing.assert_allclose(torch_mu.numpy(), mu, atol=PARITY_ATOL)
    np.testing.assert_allclose(decoder(torch.from_numpy(z)).numpy(), x_mean, atol=PARITY_ATOL)


def create_app() -> FastAPI:
    encoder, decoder, cfg = _load(Path(os.environ.get("VAE_MODEL_DIR", "models/default")))
    app = FastAPI(title="naive VAE peer")

    @app.get("/health", response_model=Health)
    def health() -> Health:
        return Health()

    @app.get("/sample", response_model=SampleOut)
    def sample(n: int = 16, seed: int | None = None) -> SampleOut:
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        z = torch.randn(n, cfg.latent_dim, generator=generator)
        with torch.no_grad():
            images = decoder(z)
        return SampleOut(latents=z.tolist(), images=images.tolist())

    @app.post("/decode", response_model=DecodeOut)
    def decode(body: DecodeIn) -> DecodeOut:
        with torch.no_grad():
            images = decoder(torch.tensor(body.latents))
        return DecodeOut(images=images.tolist())

    @app.post("/encode", response_model=EncodeOut)
    def encode(files: Annotated[list[UploadFile], File()]) -> EncodeOut:
        batch = []
        for upload in files:
            image = Image.open(io.BytesIO(upload.file.read())).convert("L")
            image = image.resize((cfg.width, cfg.height), Image.Resampling.BOX)
            batch.append(torch.tensor(np.asarray(image), dtype=torch.float32)[None] / 255.0)
        with torch.no_grad():
            mu, logvar = encoder(torch.stack(batch))
        kl = 0.5 * (logvar.exp() + mu**2 - 1.0 - logvar).sum(dim=1)
        return EncodeOut(mu=mu.tolist(), logvar=logvar.tolist(), kl=kl.tolist())

    @app.post("/kl", response_model=KLOut)
    def kl(body: KLIn) -> KLOut:
        mu, logvar = torch.tensor(body.mu), torch.tensor(body.logvar)
        return KLOut(kl=float(0.5 * (logvar.exp() + mu**2 - 1.0 - logvar).sum()))

    return app
