"""Service settings, read from the environment (prefix `VAE_`) and checked before anything is loaded."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated

import onnxruntime as ort
from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["DEFAULT_SAMPLES", "DEFAULT_STEPS", "Settings", "get_settings", "misspelt_settings"]

# The defaults of /sample's n and /interpolate's steps: the limits on them may not be lower.
DEFAULT_SAMPLES = 16
DEFAULT_STEPS = 8

# A browser's Origin header, as browsers write it: a lower-case scheme, an ASCII host (punycode for others)
# in lower case or an IPv6 address in brackets, a port only where it is not the scheme's default; or `null`
# (a file:// page, a sandboxed frame). Anything else never equals one.
_ORIGIN = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*)://(?:\[[0-9a-f:.]+\]|[a-z0-9-]+(?:\.[a-z0-9-]+)*)(?::(?P<port>[0-9]{1,5}))?"
)
_DEFAULT_PORTS = {"http": "80", "https": "443"}
# Most ONNX Runtime threads (VAE_INTRA_OP_THREADS), the default's too on a machine of more CPUs.
MAX_THREADS = 1024


def _is_origin(text: str) -> bool:
    match = _ORIGIN.fullmatch(text)
    return match is not None and match["port"] != _DEFAULT_PORTS.get(match["scheme"], "")


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _model_threads() -> int:
    """One fewer than the CPUs this process may use, at least 1: the event loop keeps a CPU of its own.

    A model run's threads that take the event loop's CPU slow every request it is parsing and answering, by
    more than they speed up runs as short as these (a coalesced run of the default or the 28x28 conv model
    takes about a millisecond at most on the CPU).
    """
    return min(MAX_THREADS, max(1, _usable_cpus() - 1))


class Settings(BaseSettings):
    """Everything the service can be told at startup; each field is the env var `VAE_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="VAE_", extra="ignore", frozen=True)

    # Directory holding model.json, encoder.onnx and decoder.onnx.
    model_dir: Path = Path("models/default")
    # ONNX Runtime execution providers in order of preference (comma-separated in the environment);
    # the ones this onnxruntime build lacks are skipped, the first that starts is used.
    providers: Annotated[list[str], NoDecode] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    # Refuse to start unless the CUDA provider is really in use (instead of silently running on the CPU).
    require_gpu: bool = False
    # Threads ONNX Runtime uses inside one operator; default: one fewer than the CPUs this process may run on.
    # More than the CPUs only contend; the bound is fixed (not this machine's CPUs, so that a value good on
    # one node is good on all) and keeps a slip of the finger from starting a million threads, which took
    # every byte of memory before the process died.
    intra_op_threads: int = Field(default_factory=_model_threads, ge=1, le=MAX_THREADS)
    # Coalesce the model runs of concurrent requests into one ONNX Runtime run, on a thread per graph
    # (off: each request runs its own batch on the event loop).
    batching: bool = True
    # Most rows (images or latents) in one coalesced run; a request with more runs alone.
    batch_max_size: int = Field(default=64, ge=1)
    # How long the first request of a run may wait for others, in microseconds; 0 coalesces only the
    # requests that queued while the previous run was busy.
    batch_max_delay_us: int = Field(default=0, ge=0, le=1_000_000)
    # Most images one request may carry (/encode, /reconstruct, /kl, /interpolate, /v2 encoder inference); at
    # least the two /interpolate takes.
    max_images: int = Field(default=64, ge=2)
    # Most latents one request may carry or ask for (/decode, /kl, /sample?n=, the v2 decoder's batch); at
    # least /sample's default n, so that a request without it is within the limit.
    max_latents: int = 256
    # Most z draws per image on /encode?samples=.
    max_samples: int = Field(default=64, ge=1)
    # Most images one /interpolate may return (steps); at least its default steps.
    max_steps: int = 64
    # Largest nearest-neighbour upscaling factor of PNG outputs (?scale=).
    max_scale: int = Field(default=32, ge=1)
    # One JSON log line per request (method, path, status, duration, request id); false turns it off.
    access_log: bool = True
    # Largest request body in bytes, checked on Content-Length and counted while it streams in (413).
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1)
    # Seconds a request's body may take to arrive, from the route's first read of it; past it 408, and the
    # request's place among max_in_flight is freed (a client that stalls mid-body would otherwise hold it).
    body_timeout: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    # Largest image, in pixels (width x height), that is decoded; bigger ones are refused from their
    # header, before decompression (413). Pillow's own guard refuses past 179 million whatever this says.
    max_image_pixels: int = Field(default=4096 * 4096, ge=1)
    # Most pixels one request's images may have together: bounds the memory and the event loop's time that
    # decoding one request takes (64 images of 4096 x 4096 would be 4 GiB of floats). Past it 413.
    max_request_pixels: int = Field(default=4096 * 4096, ge=1)
    # Requests handled at once (the probes and /metrics aside); beyond it a request gets 503 with Retry-After
    # at once instead of waiting in a queue.
    max_in_flight: int = Field(default=128, ge=1)
    # API keys (comma-separated in the environment); when set, every request needs one, as
    # `Authorization: Bearer <key>` or `X-API-Key: <key>`, but the probes, /metrics, the API docs and the
    # playground page (README, "Reliability"). Empty: no authentication.
    api_keys: Annotated[list[SecretStr], NoDecode] = []
    # Origins that browsers may call the API from (comma-separated; `*` for any). Empty: no CORS headers.
    cors_origins: Annotated[list[str], NoDecode] = []
    # Seconds `python -m service` gives requests in flight to finish after SIGTERM before it cancels them;
    # with the model runs the shutdown then waits for (runtime.SHUTDOWN_WAIT_S), below the orchestrator's
    # grace period (compose: 35 s), so that shutdown completes before SIGKILL.
    drain_timeout: int = Field(default=20, ge=1)
    # Seconds an idle keep-alive connection stays open (uvicorn's default is 5, the least taken: Compose's
    # nginx closes its own after 4). Above the idle timeout of the proxy in front (ingress-nginx and AWS's
    # load balancers: 60 s; Google Cloud's: 600 s, so 620 there): a proxy that sends a request on a
    # connection the server is closing gets a 502, which it does not retry for a POST.
    keep_alive_timeout: int = Field(default=75, ge=5)
    # Seconds one model run may take before /health and /ready answer 503: a run that never returns (a
    # hung GPU) leaves every later request waiting, and the orchestrator's liveness probe then restarts
    # the process.
    stall_timeout: float = Field(default=30.0, gt=0, allow_inf_nan=False)

    @field_validator("model_dir", mode="before")
    @classmethod
    def _model_dir_given(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():  # Path("") is the working directory
            raise ValueError("is empty; set VAE_MODEL_DIR to the directory of model.json (or leave it unset)")
        return value

    @field_validator("model_dir")
    @classmethod
    def _model_dir_exists(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"model directory {str(value)!r} does not exist (set VAE_MODEL_DIR)")
        return value

    @field_validator("providers", "api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _some_key_if_set(cls, value: object) -> object:
        # Fails closed: a value that was meant to hold keys but holds none (a secret that came out empty
        # but for a comma or a space) would otherwise start the server with no authentication at all.
        if isinstance(value, str) and value and not value.replace(",", "").strip():
            raise ValueError(
                f"{value!r} names no API key; give comma-separated keys, or leave it empty (unset, or '') "
                "for no authentication"
            )
        return value

    @field_validator("max_latents", "max_steps")
    @classmethod
    def _at_least_the_default(cls, value: int, info: ValidationInfo) -> int:
        option, route, default = {
            "max_latents": ("n", "/sample", DEFAULT_SAMPLES),
            "max_steps": ("steps", "/interpolate", DEFAULT_STEPS),
        }[str(info.field_name)]
        if value < default:
            raise ValueError(
                f"{value} is below {default}, the {option} of {route} when a request gives none; "
                f"it must be at least {default}"
            )
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        # What a browser sends as Origin: scheme://host[:port], nothing after it. `https://app.example/`
        # never equals one, and would turn CORS off without a word.
        wrong = [origin for origin in value if origin not in ("*", "null") and not _is_origin(origin)]
        if wrong:
            raise ValueError(
                f"{', '.join(repr(origin) for origin in wrong)}: not an origin as browsers send it; give "
                "scheme://host[:port] in lower case (no path, no trailing slash or dot, no default port, "
                "punycode for a non-ASCII host), or * for any"
            )
        return value

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("no execution provider given (set VAE_PROVIDERS, e.g. CPUExecutionProvider)")
        known = ort.get_all_providers()
        unknown = [name for name in value if name not in known]
        if unknown:
            raise ValueError(f"unknown execution provider {', '.join(unknown)}; known: {', '.join(known)}")
        return value


@lru_cache
def get_settings() -> Settings:
    """Settings from the environment, read once per process."""
    return Settings()


def misspelt_settings(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """(variable, the setting it is close to) for each VAE_ variable that is no setting but nearly one:
    `VAE_MAX_IMAGE` is ignored like any variable that is not a setting (others share the prefix: Kubernetes
    makes VAE_SERVICE_HOST and the like for a Service named vae), so startup warns of it."""
    names = [f"VAE_{name.upper()}" for name in Settings.model_fields]
    found = []
    for variable in sorted(environ):
        upper = variable.upper()  # settings are read whatever the case of the variable's name
        if upper.startswith("VAE_") and upper not in names:
            close = difflib.get_close_matches(upper, names, n=1, cutoff=0.85)
            if close:
                found.append((variable, close[0]))
    return found
