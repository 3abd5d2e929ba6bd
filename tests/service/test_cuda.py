"""The CUDA execution provider: the CPU provider's answers, with the options the service sets.

Skipped where ONNX Runtime can't run on CUDA (CI has no GPU). On a machine with one, these run in
`make test`; `VAE_TEST_PROVIDERS=CUDAExecutionProvider` moves the tests of the shared `settings` and
`client` fixtures onto CUDA as well.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from service.model_card import ModelCard
from service.runtime import CUDA, CUDA_OPTIONS, Model, load_model
from service.schemas import EncodeResponse, ReadyResponse
from tests.service.conftest import CPU
from tests.service.helpers import body, digit_png, files

# Full float32 on both providers (the service turns TF32 off): only the order of the float32 sums differs.
ATOL = 1e-5
# Long enough that requests started together always join one run.
GATHER_S = 0.2


@pytest.fixture(scope="module")
def on_cuda(model_dir: Path, cuda_active: bool) -> Iterator[Model]:
    """The default model on CUDA; concurrent requests wait up to GATHER_S for each other."""
    if not cuda_active:
        pytest.skip("no working CUDA here")
    settings = Settings(
        model_dir=model_dir,
        providers=[CUDA, *CPU],
        require_gpu=True,
        batch_max_delay_us=int(GATHER_S * 1e6),
    )
    model = load_model(settings)
    yield model
    model.close()


@pytest.fixture(scope="module")
def on_cpu(model_dir: Path) -> Iterator[Model]:
    model = load_model(Settings(model_dir=model_dir, providers=CPU, batching=False))
    yield model
    model.close()


def test_sessions_run_with_the_service_options(on_cuda: Model) -> None:
    for session in (on_cuda.encoder, on_cuda.decoder):
        options = session.get_provider_options()[CUDA]
        assert (
            {name: options[name] for name in CUDA_OPTIONS}
            == CUDA_OPTIONS
            == {
                "use_tf32": "0",
                "cudnn_conv_algo_search": "HEURISTIC",
            }
        )


@pytest.mark.parametrize("rows", [1, 2, 7, 64])
def test_cuda_answers_as_the_cpu_does(on_cuda: Model, on_cpu: Model, card: ModelCard, rows: int) -> None:
    rng = np.random.default_rng(rows)
    x = rng.uniform(size=(rows, *card.input_shape)).astype(np.float32)
    z = rng.standard_normal((rows, card.latent_dim)).astype(np.float32)
    for got, expected in zip(on_cuda.encode(x), on_cpu.encode(x), strict=True):
        np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    (x_mean, logits), (cpu_x_mean, cpu_logits) = on_cuda.run("decoder", z), on_cpu.run("decoder", z)
    np.testing.assert_allclose(x_mean, cpu_x_mean, rtol=0, atol=ATOL)
    # Logits reach tens: compared relative to their size beyond 1, as the export compares them to PyTorch.
    np.testing.assert_allclose(logits, cpu_logits, rtol=ATOL, atol=ATOL)


def test_coalesced_cuda_runs_give_each_request_its_own_rows(on_cuda: Model, card: ModelCard) -> None:
    rows_run: list[int] = []
    model = replace(on_cuda, observer=lambda graph, rows, seconds: rows_run.append(rows))
    sizes = [1, 3, 1, 7, 2, 5, 1, 4]
    rng = np.random.default_rng(0)
    zs = [rng.standard_normal((rows, card.latent_dim)).astype(np.float32) for rows in sizes]

    async def all_at_once() -> list[tuple[np.ndarray, np.ndarray]]:
        return list(await asyncio.gather(*(model.decode_logits_async(z) for z in zs)))

    decoded = asyncio.run(all_at_once())
    assert rows_run == [sum(sizes)]  # one CUDA run for all eight requests
    for z, (x_mean, logits) in zip(zs, decoded, strict=True):
        alone_x_mean, alone_logits = on_cuda.run("decoder", z)
        # The batching promise (1e-6), which TF32 would break (bench/cuda.py: 5.7e-4 on this decoder).
        np.testing.assert_allclose(x_mean, alone_x_mean, rtol=0, atol=1e-6)
        np.testing.assert_allclose(logits, alone_logits, rtol=1e-6, atol=1e-6)


def test_the_app_serves_on_cuda(model_dir: Path, cuda_active: bool) -> None:
    if not cuda_active:
        pytest.skip("no working CUDA here")
    answers = {}
    for providers in ([CUDA, *CPU], CPU):
        settings = Settings(model_dir=model_dir, providers=providers, require_gpu=providers != CPU)
        with TestClient(create_app(settings)) as client:
            assert body(client.get("/ready"), ReadyResponse).provider == providers[0]
            grid = client.get("/sample?n=16&format=grid&seed=5")
            assert grid.status_code == 200 and grid.headers["content-type"] == "image/png"
            answers[providers[0]] = body(client.post("/encode", files=files(digit_png(3))), EncodeResponse)
    on_gpu, on_cpu = answers[CUDA], answers[CPU[0]]
    np.testing.assert_allclose(on_gpu.mu, on_cpu.mu, rtol=0, atol=ATOL)
    np.testing.assert_allclose(on_gpu.kl, on_cpu.kl, rtol=1e-5)
