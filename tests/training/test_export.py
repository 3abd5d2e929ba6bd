"""ONNX export: parity with PyTorch, refusal to write an unfaithful model, determinism, the model card."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jsonschema
import numpy as np
import onnxruntime as ort
import pytest
import torch

from service.model_card import load_card, sha256_file
from tests.conftest import SCHEMA
from training import export as export_module
from training.export import PARITY_BATCHES, ExportError, export
from training.plots import PLOTS
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
    (x_mean,) = _session(tiny_model / "decoder.onnx").run(["x_mean"], {"z": z.numpy()})
    with torch.no_grad():
        want_mu, want_logvar = model.encoder(x)
        want_x = model.decoder(z)
    # The export itself refuses anything above 1e-5; a few float32 ulps is what a faithful graph shows.
    for have, want in [(mu, want_mu), (logvar, want_logvar), (x_mean, want_x)]:
        torch.testing.assert_close(torch.from_numpy(have), want, rtol=0, atol=1e-5)


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


def test_export_refuses_a_model_that_fails_parity(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_module, "PARITY_TOLERANCE", -1.0)  # no graph can meet a negative tolerance
    out = tmp_path / "model"
    with pytest.raises(ExportError, match=r"encoder\.onnx: output mu at batch 1 differs from PyTorch"):
        export(tiny_run / "best.pt", out, iwae_samples=2)
    assert not out.exists()


def test_export_says_nothing_of_torchvision(
    tiny_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # torch.onnx lists the torchvision operators it skips at each export; this model uses none of them.
    with caplog.at_level(logging.INFO):
        export(tiny_run / "best.pt", tmp_path / "model", iwae_samples=2)
    messages = [record.getMessage() for record in caplog.records]
    assert any(message.startswith("ONNX parity holds") for message in messages)
    assert not [message for message in messages if "torchvision" in message]


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
