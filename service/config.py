"""Service settings, read from the environment (prefix `VAE_`) and checked before anything is loaded."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated

import onnxruntime as ort
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings", "get_settings"]


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
    # Threads ONNX Runtime uses inside one operator; default: the CPUs this process may run on.
    intra_op_threads: int = Field(default_factory=_usable_cpus, ge=1)
    # Most images one request may carry (/encode, /reconstruct, /kl).
    max_images: int = Field(default=64, ge=1)
    # Most latents one request may carry or ask for (/decode, /kl, /sample?n=).
    max_latents: int = Field(default=256, ge=1)
    # Most z draws per image on /encode?samples=.
    max_samples: int = Field(default=64, ge=1)
    # Most images one /interpolate may return (steps); at least 2.
    max_steps: int = Field(default=64, ge=2)
    # Largest nearest-neighbour upscaling factor of PNG outputs (?scale=).
    max_scale: int = Field(default=32, ge=1)

    @field_validator("model_dir")
    @classmethod
    def _model_dir_exists(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"model directory {str(value)!r} does not exist (set VAE_MODEL_DIR)")
        return value

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
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
