"""The model card (`model.json`): the one contract between `training/` and `service/`.

Training writes it next to `encoder.onnx` and `decoder.onnx`; the service reads nothing else of training.
The committed JSON Schema (`models/model_card.schema.json`) is generated from these classes:

    python -m service.model_card > models/model_card.schema.json
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, field_validator

__all__ = [
    "CARD_FILE",
    "SCHEMA_VERSION",
    "DatasetInfo",
    "InputSpec",
    "ModelCard",
    "OnnxFile",
    "SplitInfo",
    "TensorSpec",
    "TestMetrics",
    "load_card",
    "sha256_file",
]

CARD_FILE = "model.json"
SCHEMA_VERSION: Final = 1


# A file name without a directory: no slash or backslash, and not "." or "..".
_FILE_NAME = r"^[^/\\]*[^/\\.][^/\\]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One input or output of an ONNX graph."""

    name: str
    # None marks the dynamic batch axis.
    shape: list[int | None]
    dtype: Literal["float32"] = "float32"


class OnnxFile(_Strict):
    """An exported ONNX graph and its interface."""

    # A file in the model directory: its name alone, no path.
    file: str = Field(json_schema_extra={"pattern": _FILE_NAME})
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @field_validator("file")
    @classmethod
    def _a_name_in_the_model_directory(cls, file: str) -> str:
        if not re.fullmatch(_FILE_NAME, file):
            raise ValueError(f"{file!r} is not a file name: the graphs are files in the model directory")
        return file


class InputSpec(_Strict):
    """What the encoder takes: shape, pixel range and polarity of the images it was trained on."""

    channels: Literal[1, 3]
    height: int = Field(ge=1)
    width: int = Field(ge=1)
    # The values the encoder takes for black and white (/encode maps the images it reads in [0, 1] there).
    pixel_range: tuple[FiniteFloat, FiniteFloat] = (0.0, 1.0)
    # "light": strokes are high values on a dark background (digits, MNIST); "dark": the reverse.
    foreground: Literal["light", "dark"]

    @field_validator("pixel_range")
    @classmethod
    def _black_below_white(cls, pixel_range: tuple[float, float]) -> tuple[float, float]:
        low, high = pixel_range
        if not low < high:
            raise ValueError(f"[{low:g}, {high:g}]: its low end must be below its high end")
        return pixel_range


class SplitInfo(_Strict):
    """The seeded train / validation / test split the metrics refer to."""

    seed: int
    train: int = Field(ge=0)
    val: int = Field(ge=0)
    test: int = Field(ge=0)


class DatasetInfo(_Strict):
    """Where the training images came from."""

    name: Literal["digits", "idx", "folder"]
    source: str
    split: SplitInfo


class TestMetrics(_Strict):
    """Test-split metrics from `python -m training evaluate`, in nats per image."""

    neg_elbo: float
    reconstruction: float
    kl: float
    # Importance-weighted estimate of -log p(x) with `iwae_samples` samples (Burda et al., 2016).
    iwae_nll: float
    iwae_samples: int = Field(ge=1)
    # Latent dimensions with Cov_x(E_q[z]) > 0.01 (Burda et al., 2016).
    active_units: int = Field(ge=0)
    images: int = Field(ge=1)


class ModelCard(_Strict):
    """Everything the service needs to know about an exported VAE."""

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    created_at: datetime
    architecture: Literal["mlp", "conv"]
    input: InputSpec
    latent_dim: int = Field(ge=1)
    likelihood: Literal["bernoulli"]
    # The encoder clamps log sigma^2 to this range inside the graph.
    logvar_range: tuple[float, float]
    encoder: OnnxFile
    decoder: OnnxFile
    opset: int
    dataset: DatasetInfo
    training: dict[str, Any]
    metrics: TestMetrics
    versions: dict[str, str]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return (self.input.channels, self.input.height, self.input.width)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_card(model_dir: Path) -> ModelCard:
    """Read and validate `model.json` in `model_dir` (raises ValueError naming the problem)."""
    path = model_dir / CARD_FILE
    try:
        if not path.is_file():
            raise ValueError(f"{path}: model card not found")
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from error
    except OSError as error:  # another user's file (mode 600), or in a directory of mode 700
        raise ValueError(f"{path}: cannot be read ({error.strerror})") from error
    try:
        return ModelCard.model_validate(raw)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def json_schema() -> dict[str, Any]:
    """The JSON Schema of model.json."""
    schema = ModelCard.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = f"VAE model card, schema version {SCHEMA_VERSION}"
    return schema


if __name__ == "__main__":
    print(json.dumps(json_schema(), indent=2))
