"""Service fixtures: the committed default model, settings for it, and one app with its lifespan run."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from service.model_card import ModelCard, load_card
from service.runtime import CUDA

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "default"
CPU = ["CPUExecutionProvider"]
# The service tests run on the CPU provider, so that they behave the same on machines with and without a
# GPU; VAE_TEST_PROVIDERS=CUDAExecutionProvider runs the tests of the shared `settings` and `client`
# fixtures on the GPU instead (README, "On a GPU"). Read as VAE_PROVIDERS is: comma-separated, spaces
# around names ignored.
PROVIDERS = [
    name.strip() for name in os.environ.get("VAE_TEST_PROVIDERS", "").split(",") if name.strip()
] or CPU


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """models/default as exported by `make train` (committed)."""
    assert (MODEL_DIR / "model.json").is_file(), f"{MODEL_DIR} has no model.json: run `make train`"
    return MODEL_DIR


@pytest.fixture(scope="session")
def card(model_dir: Path) -> ModelCard:
    return load_card(model_dir)


@pytest.fixture(scope="session")
def settings(model_dir: Path) -> Settings:
    # CUDA asked for first must really run: no silent fall-back to the CPU.
    return Settings(
        model_dir=model_dir, providers=PROVIDERS, require_gpu=PROVIDERS[0] == CUDA, intra_op_threads=1
    )


@pytest.fixture(scope="session")
def client(settings: Settings) -> Iterator[TestClient]:
    """One app for the whole session, lifespan included (its model loads once)."""
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def model_copy(model_dir: Path, tmp_path: Path) -> Path:
    """A writable copy of the default model directory, for tampering with."""
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    return copy


@pytest.fixture
def free_port() -> int:
    """A loopback port nothing listens on, for a real server process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def cuda_active(model_dir: Path, card: ModelCard) -> bool:
    """Whether ONNX Runtime really runs on CUDA here (not merely lists the provider)."""
    import onnxruntime as ort

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    available = [name for name in providers if name in ort.get_available_providers()]
    session = ort.InferenceSession(str(model_dir / card.encoder.file), providers=available)
    return bool(session.get_providers()[0] == "CUDAExecutionProvider")


# Small request limits, so that each bound can be crossed with a small request.
LIMITS = {"max_images": 2, "max_latents": 3, "max_samples": 2, "max_steps": 4, "max_scale": 2}


@pytest.fixture(scope="session")
def limited(settings: Settings) -> Iterator[TestClient]:
    """An app with the small `LIMITS`."""
    with TestClient(create_app(settings.model_copy(update=LIMITS))) as test_client:
        yield test_client
