"""Settings from the environment, and the checks that stop a bad configuration before anything loads."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from service import config
from service.config import Settings, get_settings, misspelt_settings


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, model_dir: Path) -> pytest.MonkeyPatch:
    """A clean VAE_* environment pointing at the default model."""
    for name in list(os.environ):
        if name.startswith("VAE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("VAE_MODEL_DIR", str(model_dir))
    return monkeypatch


def test_defaults(env: pytest.MonkeyPatch, model_dir: Path) -> None:
    settings = Settings()
    assert settings.model_dir == model_dir
    assert settings.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert settings.require_gpu is False
    # ONNX Runtime leaves a CPU to the event loop.
    assert settings.intra_op_threads == max(1, len(os.sched_getaffinity(0)) - 1)


def test_environment_is_read_with_the_prefix(env: pytest.MonkeyPatch) -> None:
    env.setenv("VAE_PROVIDERS", " CPUExecutionProvider , CUDAExecutionProvider")
    env.setenv("VAE_REQUIRE_GPU", "true")
    env.setenv("VAE_INTRA_OP_THREADS", "3")
    env.setenv("VAE_MAX_IMAGES", "5")
    settings = Settings()
    assert settings.providers == ["CPUExecutionProvider", "CUDAExecutionProvider"]
    assert settings.require_gpu is True
    assert settings.intra_op_threads == 3
    assert settings.max_images == 5


def test_missing_model_dir_fails_fast(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("VAE_MODEL_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(
        ValidationError, match=r"model directory '.*nowhere' does not exist \(set VAE_MODEL_DIR\)"
    ):
        Settings()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "CPUExecutionProvider,GPUExecutionProvider",
            "unknown execution provider GPUExecutionProvider; known: ",
        ),
        (" , ", "no execution provider given"),
    ],
    ids=["unknown-name", "empty"],
)
def test_bad_provider_names_fail_fast(env: pytest.MonkeyPatch, value: str, message: str) -> None:
    env.setenv("VAE_PROVIDERS", value)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_api_keys_are_read_and_an_empty_value_means_none(env: pytest.MonkeyPatch) -> None:
    env.setenv("VAE_API_KEYS", " first-key-0123456789 ,, second-key-0123456789")
    keys = [key.get_secret_value() for key in Settings().api_keys]
    assert keys == ["first-key-0123456789", "second-key-0123456789"]
    env.setenv("VAE_API_KEYS", "")
    assert Settings().api_keys == []


@pytest.mark.parametrize("value", [",", " ", " , ,"])
def test_api_keys_that_name_no_key_fail_fast(env: pytest.MonkeyPatch, value: str) -> None:
    """Meant to hold keys but holding none: a startup error, not a server open to everyone."""
    env.setenv("VAE_API_KEYS", value)
    with pytest.raises(ValidationError, match=r"api_keys\n.* names no API key; give comma-separated keys"):
        Settings()


@pytest.mark.parametrize(
    "name",
    [
        "INTRA_OP_THREADS",
        "MAX_IMAGES",
        "MAX_LATENTS",
        "MAX_SAMPLES",
        "MAX_SCALE",
        "MAX_IN_FLIGHT",
        "BATCH_MAX_SIZE",
        "MAX_BODY_BYTES",
        "MAX_IMAGE_PIXELS",
        "MAX_REQUEST_PIXELS",
        "DRAIN_TIMEOUT",
        "KEEP_ALIVE_TIMEOUT",
        "BODY_TIMEOUT",
        "STALL_TIMEOUT",
    ],
)
def test_counts_must_be_positive(env: pytest.MonkeyPatch, name: str) -> None:
    """0 would refuse every request (in flight, body bytes, pixels), or never run or wait for anything."""
    env.setenv(f"VAE_{name}", "0")
    with pytest.raises(ValidationError, match=name.lower()):
        Settings()


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("MAX_LATENTS", "15", "15 is below 16, the n of /sample when a request gives none"),
        ("MAX_LATENTS", "0", "0 is below 16, the n of /sample"),
        ("MAX_STEPS", "7", "7 is below 8, the steps of /interpolate when a request gives none"),
        ("MAX_IMAGES", "1", "greater than or equal to 2"),  # the two images /interpolate takes
        ("INTRA_OP_THREADS", "1000000", "less than or equal to 1024"),
        ("BATCH_MAX_DELAY_US", "1000001", "less than or equal to 1000000"),
        ("STALL_TIMEOUT", "inf", "finite number"),
        ("MODEL_DIR", "", "is empty; set VAE_MODEL_DIR to the directory of model.json"),
        ("CORS_ORIGINS", "https://app.example/", "'https://app.example/': not an origin as browsers send it"),
        ("CORS_ORIGINS", "https://ok.example,not a url", "'not a url': not an origin"),
        ("CORS_ORIGINS", "https://App.Example", "'https://App.Example': not an origin"),
        ("CORS_ORIGINS", "https://app.example:443", "'https://app.example:443': not an origin"),
        ("CORS_ORIGINS", "https://*.example.com", "'https://*.example.com': not an origin"),
        ("CORS_ORIGINS", "https://bücher.example", "not an origin"),
        ("CORS_ORIGINS", "https://app.example.", "not an origin"),
    ],
    ids=[
        "latents-below-sample-n",
        "latents-zero",
        "steps-below-default",
        "images-below-interpolate",
        "threads",
        "batch-delay-over-a-second",
        "stall-timeout-infinite",
        "empty-model-dir",
        "origin-path",
        "origin",
        "origin-case",
        "origin-default-port",
        "origin-wildcard",
        "origin-not-ascii",
        "origin-trailing-dot",
    ],
)
def test_settings_that_could_never_work_fail_fast(
    env: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    env.setenv(f"VAE_{name}", value)
    with pytest.raises(ValidationError, match=re.escape(message)):
        Settings()


def test_origins_and_limits_that_work_are_taken(env: pytest.MonkeyPatch) -> None:
    origins = [
        "https://app.example",
        "http://localhost:3000",
        "http://[::1]:8080",
        "https://xn--bcher-kva.example",
    ]
    env.setenv("VAE_CORS_ORIGINS", ", ".join([*origins, "null", "chrome-extension://abcdef", "*"]))
    env.setenv("VAE_MAX_LATENTS", "16")
    settings = Settings()
    assert settings.cors_origins == [*origins, "null", "chrome-extension://abcdef", "*"]
    assert settings.max_latents == 16


def test_a_variable_one_letter_off_a_setting_is_named(env: pytest.MonkeyPatch) -> None:
    environ = {
        "VAE_MAX_IMAGE": "5",
        "VAE_BATCH_MAX_DELAY": "9",
        "VAE_SERVICE_HOST": "10.0.0.1",
        "VAE_PORT": "1",
    }
    assert misspelt_settings(environ) == [
        ("VAE_BATCH_MAX_DELAY", "VAE_BATCH_MAX_DELAY_US"),
        ("VAE_MAX_IMAGE", "VAE_MAX_IMAGES"),
    ]
    # Read whatever the case of the name (as the settings are): not a misspelling.
    assert misspelt_settings({"VAE_MAX_IMAGEs": "3", "vae_max_images": "3"}) == []


def test_the_default_thread_count_stays_within_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "_usable_cpus", lambda: 4000)
    assert config._model_threads() == config.MAX_THREADS


def test_body_timeout_is_seconds_above_zero(env: pytest.MonkeyPatch) -> None:
    assert Settings().body_timeout == 30.0
    env.setenv("VAE_BODY_TIMEOUT", "2.5")
    assert Settings().body_timeout == 2.5
    for value in ("0", "-1", "inf", "nan"):
        env.setenv("VAE_BODY_TIMEOUT", value)
        with pytest.raises(ValidationError, match="body_timeout"):
            Settings()


def test_get_settings_reads_the_environment_once(env: pytest.MonkeyPatch) -> None:
    get_settings.cache_clear()
    try:
        first = get_settings()
        env.setenv("VAE_MAX_IMAGES", "7")
        assert get_settings() is first
        get_settings.cache_clear()
        assert get_settings().max_images == 7
    finally:
        get_settings.cache_clear()


def test_startup_warns_of_a_misspelt_setting(
    env: pytest.MonkeyPatch, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    from service.main import create_app

    env.setenv("VAE_MAX_IMAGE", "5")
    with caplog.at_level(logging.WARNING, logger="service.main"):
        create_app(settings)
    assert "VAE_MAX_IMAGE is not a setting, and is ignored: did you mean VAE_MAX_IMAGES?" in caplog.text


def test_keep_alive_is_not_below_the_balancers_own(env: pytest.MonkeyPatch) -> None:
    """Compose's nginx closes its idle connections to a replica after 4 s: a replica that closed first
    could be sent a request on a connection it is closing (a 502 for a POST)."""
    env.setenv("VAE_KEEP_ALIVE_TIMEOUT", "4")
    with pytest.raises(ValidationError, match="greater than or equal to 5"):
        Settings()
