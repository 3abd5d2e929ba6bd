"""ONNX export: parity with PyTorch, refusal to write an unfaithful model, determinism, the model card."""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from service.model_card import load_card, sha256_file
from tests.conftest import SCHEMA
from training import export as export_module
from training.__main__ import main
from training.export import PARITY_BATCHES, ExportError, export
from training.model import VAE, VAEConfig
from training.plots import PLOTS, write_plots
from training.train import load_checkpoint


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch", PARITY_BATCHES, ids=lambda b: f"batch{b}")
def test_onnx_matches_pytorch(tiny_run: Path, tiny_model: Path, batch: int) -> None:
    model = load_checkpoint(tiny_run / "best.pt").build()
    g = torch.Generator().manual_seed(batch)
    x = torch.rand((batch, 1, 8, 8), generator=g)
    z = 2 * torch.randn((batch, 3), generator=g)
    mu, logvar = _session(tiny_model / "encoder.onnx").run(["mu", "logvar"], {"x": x.numpy()})
    x_mean, logits = _session(tiny_model / "decoder.onnx").run(["x_mean", "logits"], {"z": z.numpy()})
    with torch.no_grad():
        want_mu, want_logvar = model.encoder(x)
        want_x, want_logits = model.decoder(z), model.decoder.logits(z)
    # The export itself refuses anything above 1e-5; a few float32 ulps is what a faithful graph shows.
    for have, want in [(mu, want_mu), (logvar, want_logvar), (x_mean, want_x)]:
        torch.testing.assert_close(torch.from_numpy(have), want, rtol=0, atol=1e-5)
    # Logits reach beyond 1, where the export compares them relative to their size.
    torch.testing.assert_close(torch.from_numpy(logits), want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.sigmoid(torch.from_numpy(logits)), want_x, rtol=0, atol=1e-5)


def test_card_validates_against_committed_schema_and_hashes_match(tiny_run: Path, tiny_model: Path) -> None:
    raw = json.loads((tiny_model / "model.json").read_text())
    jsonschema.validate(raw, json.loads(SCHEMA.read_text()))
    card = load_card(tiny_model)
    assert card.encoder.sha256 == sha256_file(tiny_model / "encoder.onnx")
    assert card.decoder.sha256 == sha256_file(tiny_model / "decoder.onnx")
    assert card.latent_dim == 3 and card.input_shape == (1, 8, 8)
    assert [t.name for t in card.encoder.outputs] == ["mu", "logvar"]
    assert card.encoder.inputs[0].shape == [None, 1, 8, 8]
    assert card.decoder.outputs[0].shape == [None, 1, 8, 8]
    assert card.metrics.iwae_samples == 8 and card.metrics.images == card.dataset.split.test == 359
    # The epoch the exported weights are from, and the length of the run (two epochs, the first in warm-up).
    assert (card.training["epoch"], card.training["epochs_run"]) == (
        load_checkpoint(tiny_run / "best.pt").epoch,
        2,
    )
    # The IWAE bound is tighter than the one-sample ELBO on average; allow the one-sample noise.
    assert card.metrics.iwae_nll < card.metrics.neg_elbo + 1.0
    assert set(PLOTS) <= {p.name for p in tiny_model.iterdir()}
    # Nothing of the machine that exported it (the exporter's per-node stack traces) is in the files.
    for name in ("encoder.onnx", "decoder.onnx"):
        assert b"site-packages" not in (tiny_model / name).read_bytes(), name


def refused_and_nothing_written(tiny_run: Path, tmp_path: Path, message: str) -> None:
    """Exporting `tiny_run` raises ExportError matching `message`, and leaves no model directory."""
    out = tmp_path / "model"
    with pytest.raises(ExportError, match=message):
        export(tiny_run / "best.pt", out, iwae_samples=2)
    assert not out.exists()


def test_the_cli_names_a_refused_export_without_a_traceback(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(export_module, "PARITY_TOLERANCE", -1.0)  # no graph can meet a negative tolerance
    out = tmp_path / "model"
    assert main(["export", "--checkpoint", str(tiny_run / "best.pt"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: encoder.onnx: output mu at batch 1 differs from PyTorch" in err and "Traceback" not in err
    assert not out.exists()


def test_export_refuses_a_model_that_fails_parity(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_module, "PARITY_TOLERANCE", -1.0)  # no graph can meet a negative tolerance
    refused_and_nothing_written(
        tiny_run, tmp_path, r"encoder\.onnx: output mu at batch 1 differs from PyTorch"
    )


def test_export_refuses_outputs_that_are_nan_on_both_sides(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NaN compares false with any tolerance: a decoder of NaN weights, in PyTorch and ONNX alike, passed."""
    ckpt = load_checkpoint(tiny_run / "best.pt")
    broken = {
        name: tensor * math.nan if name.startswith("decoder.") else tensor
        for name, tensor in ckpt.model.items()
    }
    real_load = export_module.load_checkpoint

    def loaded(path: Path) -> Any:
        loaded_ckpt = real_load(path)
        loaded_ckpt.model = broken
        return loaded_ckpt

    monkeypatch.setattr(export_module, "load_checkpoint", loaded)
    refused_and_nothing_written(
        tiny_run, tmp_path, r"decoder\.onnx: output x_mean at batch 1 holds NaN or infinite values"
    )


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (0, r"^decoder\.onnx: output x_mean at batch 7 differs from PyTorch by 0\.0001 "),
        (
            1,
            r"^decoder\.onnx: output logits at batch 7 differs from PyTorch by 0\.0001 "
            r"of max\(1, \|value\|\) ",
        ),
    ],
    ids=["x_mean", "logits"],
)
def test_export_refuses_a_decoder_off_by_1e_4_at_one_batch_size(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output: int, message: str
) -> None:
    """Parity is checked for the decoder as for the encoder, at every batch size, to 1e-5: one pixel of
    decoder.onnx off by 1e-4 at batch 7 alone is enough for nothing to be written (logits, which reach tens,
    to 1e-5 of their size beyond 1)."""

    class OffAtBatch7(ort.InferenceSession):
        def __init__(self, path: str, *args: Any, **kwargs: Any) -> None:
            super().__init__(path, *args, **kwargs)
            self.decoder = Path(path).name == "decoder.onnx"

        def run(self, output_names: Any, input_feed: dict[str, np.ndarray], *args: Any) -> Any:
            outputs = super().run(output_names, input_feed, *args)
            if self.decoder and len(next(iter(input_feed.values()))) == 7:
                value = outputs[output][3, 0, 2, 5]
                outputs[output][3, 0, 2, 5] += 1e-4 * max(1.0, abs(float(value)))
            return outputs

    monkeypatch.setattr(export_module.ort, "InferenceSession", OffAtBatch7)
    refused_and_nothing_written(tiny_run, tmp_path, message)


def test_export_says_nothing_of_torchvision(
    tiny_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # torch.onnx lists the torchvision operators it skips at each export; this model uses none of them.
    with caplog.at_level(logging.INFO):
        export(tiny_run / "best.pt", tmp_path / "model", iwae_samples=2)
    messages = [record.getMessage() for record in caplog.records]
    assert any(message.startswith("ONNX parity holds") for message in messages)
    assert not [message for message in messages if "torchvision" in message]


def test_a_model_trained_on_dark_strokes_says_so_in_its_card(tmp_path: Path) -> None:
    """The service inverts uploads by the card's `input.foreground`: a model trained on dark strokes on light
    paper must be exported as such, or every image it is sent is read the wrong way round."""
    from training.__main__ import main

    data = tmp_path / "data"
    data.mkdir()
    for i in range(20):
        Image.new("L", (8, 8), 255 - 10 * i).save(data / f"{i:02}.png")
    folder = ["--dataset", "folder", "--data-dir", str(data), "--image-size", "8", "--foreground", "dark"]
    quick = ["--hidden", "8", "--latent-dim", "2", "--warmup-epochs", "1", "--no-progress"]
    assert main(["train", "--out", str(tmp_path / "run"), "--epochs", "1", *folder, *quick]) == 0
    card = export(tmp_path / "run" / "best.pt", tmp_path / "model", iwae_samples=2)
    assert card.input.foreground == load_card(tmp_path / "model").input.foreground == "dark"


def test_the_plots_of_an_unlabelled_dataset_are_drawn_without_a_warning(tmp_path: Path) -> None:
    """A folder of images without sub-directories, or IDX images without a label file, has no labels: the
    latent map is drawn in one colour, with no colormap for matplotlib to warn that it ignores."""
    model = VAE(VAEConfig(hidden=[8], latent_dim=2))
    images = np.random.default_rng(0).random((10, 1, 8, 8), dtype=np.float32)
    terms = ("neg_elbo", "reconstruction", "kl")
    losses = {f"{part}_{term}": 1.0 for part in ("train", "val") for term in terms}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_plots(model, [{"epoch": 1, **losses}], images, None, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == set(PLOTS)


def test_the_latent_map_of_a_one_image_test_split_is_drawn(tmp_path: Path) -> None:
    """One test image has one principal component (a folder of 5 images splits so): the map needs two."""
    model = VAE(VAEConfig(hidden=[8], latent_dim=4))
    images = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    losses = {
        f"{part}_{term}": 1.0 for part in ("train", "val") for term in ("neg_elbo", "reconstruction", "kl")
    }
    write_plots(model, [{"epoch": 1, **losses}], images, np.array([3]), tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == set(PLOTS)


@pytest.mark.slow
def test_same_seed_gives_the_same_onnx_outputs(tmp_path: Path) -> None:
    from training.__main__ import main

    outputs = []
    for name in ("a", "b"):
        argv = [
            "train",
            "--out",
            str(tmp_path / name),
            "--epochs",
            "1",
            "--hidden",
            "16",
            "--latent-dim",
            "2",
        ]
        assert main([*argv, "--seed", "11", "--no-progress"]) == 0
        argv = [
            "export",
            "--checkpoint",
            str(tmp_path / name / "best.pt"),
            "--out",
            str(tmp_path / f"m{name}"),
        ]
        assert main([*argv, "--iwae-samples", "2"]) == 0
        z = np.random.default_rng(0).standard_normal((5, 2)).astype(np.float32)
        outputs.append(_session(tmp_path / f"m{name}" / "decoder.onnx").run(None, {"z": z})[0])
    np.testing.assert_array_equal(outputs[0], outputs[1])
