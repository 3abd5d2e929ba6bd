"""Loading the model: providers, the model-card checks that stop startup, warm-up, the runs themselves."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from service.model_card import ModelCard, sha256_file
from service.runtime import CUDA, ModelError, load_model
from tests.service.conftest import CPU


def edit_card(model_dir: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = model_dir / "model.json"
    card = json.loads(path.read_text())
    change(card)
    path.write_text(json.dumps(card))


def load(model_dir: Path, **overrides: Any) -> None:
    load_model(Settings(model_dir=model_dir, **({"providers": CPU} | overrides)))


def test_loads_and_runs(settings: Settings, card: ModelCard) -> None:
    model = load_model(settings)
    assert model.provider == settings.providers[0]
    assert model.latent_dim == card.latent_dim
    c, h, w = card.input_shape
    mu, logvar = model.encode(np.random.default_rng(0).uniform(size=(3, c, h, w)).astype(np.float32))
    assert mu.shape == logvar.shape == (3, card.latent_dim)
    low, high = card.logvar_range
    assert (logvar >= low - 1e-5).all() and (logvar <= high + 1e-5).all()  # the graph clamps it
    x_mean = model.decode(mu)
    assert x_mean.shape == (3, c, h, w)
    assert (x_mean >= 0).all() and (x_mean <= 1).all()


def test_sessions_run_with_the_configured_threads_and_do_not_spin(settings: Settings) -> None:
    """VAE_INTRA_OP_THREADS reaches ONNX Runtime (replicas that share a CPU host each set their share)."""
    model = load_model(settings.model_copy(update={"intra_op_threads": 3}))
    for session in (model.encoder, model.decoder):
        options = session.get_session_options()
        assert options.intra_op_num_threads == 3
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_images_reach_the_encoder_in_the_cards_pixel_range(model_copy: Path, card: ModelCard) -> None:
    """A model trained on pixels in [-1, 1] gets the images (read in [0, 1]) as 2x - 1."""
    edit_card(model_copy, lambda raw: raw["input"].update(pixel_range=[-1.0, 1.0]))
    model = load_model(Settings(model_dir=model_copy, providers=CPU))
    images = np.random.default_rng(0).uniform(size=(3, *card.input_shape)).astype(np.float32)
    encoder = ort.InferenceSession(str(model_copy / card.encoder.file), providers=CPU)
    expected = encoder.run(["mu", "logvar"], {"x": 2 * images - 1})
    for got, want in zip(model.encode(images), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 2, 7], ids=["one", "two", "seven"])
def test_batch_axis_is_dynamic(settings: Settings, card: ModelCard, batch: int) -> None:
    model = load_model(settings)
    mu, _ = model.encode(np.zeros((batch, *card.input_shape), dtype=np.float32))
    assert model.decode(mu).shape == (batch, *card.input_shape)


def test_default_providers_fall_back_to_the_cpu(model_dir: Path, cuda_active: bool) -> None:
    model = load_model(Settings(model_dir=model_dir))
    assert model.provider == (CUDA if cuda_active else "CPUExecutionProvider")


def test_require_gpu_on_a_cpu_machine_stops_startup(model_dir: Path, cuda_active: bool) -> None:
    if cuda_active:
        pytest.skip("CUDA is active here; the refusal only happens without it")
    with pytest.raises(
        ModelError, match=r"VAE_REQUIRE_GPU=true but ONNX Runtime runs on CPUExecutionProvider"
    ) as refused:
        load_model(Settings(model_dir=model_dir, require_gpu=True))
    if CUDA in ort.get_available_providers():
        # The build has the provider but it could not start: the error carries ONNX Runtime's reason.
        assert "; ONNX Runtime said: " in str(refused.value)
        assert "onnxruntime_providers_cuda" in str(refused.value).split("ONNX Runtime said: ")[1]


def test_require_gpu_on_a_gpu_machine_runs_on_cuda(model_dir: Path, cuda_active: bool) -> None:
    if not cuda_active:
        pytest.skip("no working CUDA here")
    assert load_model(Settings(model_dir=model_dir, require_gpu=True)).provider == CUDA


def test_providers_missing_from_this_build_are_refused(model_dir: Path) -> None:
    with pytest.raises(ModelError, match="none of the execution providers DmlExecutionProvider is in this"):
        load(model_dir, providers=["DmlExecutionProvider"])


def test_missing_directory(tmp_path: Path, settings: Settings) -> None:
    # Settings refuses a missing directory already; the runtime checks again for one removed since.
    gone = settings.model_copy(update={"model_dir": tmp_path / "gone"})
    with pytest.raises(ModelError, match="gone: model directory not found"):
        load_model(gone)


def test_missing_card(model_copy: Path) -> None:
    (model_copy / "model.json").unlink()
    with pytest.raises(ModelError, match="model.json: model card not found"):
        load(model_copy)


def test_files_this_process_cannot_read_are_named(
    model_copy: Path, card: ModelCard, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files of another user's (the trainer's, under umask 077, for the API's uid): one line naming the file,
    where there was only the traceback of a PermissionError. Simulated, as root reads everything: opening
    the files refused (mode 600), then looking them up at all (their directory of mode 700)."""
    refused: dict[str, set[Path]] = {"open": set(), "stat": set()}
    originals = {name: getattr(Path, name) for name in refused}

    def guarded(name: str) -> Callable[..., Any]:
        def call(path: Path, *args: Any, **kwargs: Any) -> Any:
            if path in refused[name]:
                raise PermissionError(13, "Permission denied", str(path))
            return originals[name](path, *args, **kwargs)

        return call

    for name in refused:
        monkeypatch.setattr(Path, name, guarded(name))
    files = [model_copy / name for name in ("model.json", card.encoder.file, card.decoder.file)]
    refused["open"].add(files[2])
    with pytest.raises(
        ModelError, match=rf"{card.decoder.file}: cannot be read \(Permission denied; model.json decoder.file"
    ):
        load(model_copy)
    refused["open"].add(files[0])
    with pytest.raises(ModelError, match=r"model.json: cannot be read \(Permission denied\)$"):
        load(model_copy)
    refused["open"].clear()
    refused["stat"].update(files)
    with pytest.raises(ModelError, match=r"model.json: cannot be read \(Permission denied\)$"):
        load(model_copy)
    refused["stat"].remove(files[0])
    with pytest.raises(
        ModelError, match=rf"{card.encoder.file}: cannot be read \(Permission denied; model.json encoder.file"
    ):
        load(model_copy)


def test_a_card_that_is_not_text_is_named(model_copy: Path) -> None:
    (model_copy / "model.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ModelError, match=r"model.json: not UTF-8 text"):
        load(model_copy)


def test_missing_onnx_file(model_copy: Path, card: ModelCard) -> None:
    (model_copy / card.decoder.file).unlink()
    with pytest.raises(ModelError, match=rf"{card.decoder.file}: not found \(model.json decoder.file\)"):
        load(model_copy)


def test_changed_onnx_file_fails_the_sha256(model_copy: Path, card: ModelCard) -> None:
    with (model_copy / card.encoder.file).open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(
        ModelError, match=rf"{card.encoder.file}: sha256 is [0-9a-f]{{64}} but model.json encoder"
    ):
        load(model_copy)


def test_wrong_sha256_in_the_card(model_copy: Path, card: ModelCard) -> None:
    edit_card(model_copy, lambda raw: raw["decoder"].update(sha256="0" * 64))
    with pytest.raises(
        ModelError, match=rf"{card.decoder.file}: sha256 is .* but model.json decoder.sha256 says 0{{64}}"
    ):
        load(model_copy)


def test_corrupt_onnx_file_with_a_matching_hash(model_copy: Path, card: ModelCard) -> None:
    path = model_copy / card.encoder.file
    path.write_bytes(b"not a protobuf")
    edit_card(model_copy, lambda raw: raw["encoder"].update(sha256=sha256_file(path)))
    with pytest.raises(ModelError, match=rf"{card.encoder.file}: ONNX Runtime cannot load it"):
        load(model_copy)


@pytest.mark.parametrize("file", ["../default/encoder.onnx", "/tmp/encoder.onnx", "sub/encoder.onnx", ".."])
def test_a_graph_outside_the_model_directory_is_refused(model_copy: Path, card: ModelCard, file: str) -> None:
    """The card names files in its directory: a path would serve a graph from elsewhere, the hash checked
    against a card that was never exported with it."""
    edit_card(model_copy, lambda raw: raw["encoder"].update(file=file))
    with pytest.raises(ModelError, match=rf"encoder.file\n.* '{re.escape(file)}' is not a file name"):
        load(model_copy)


@pytest.mark.parametrize("pixel_range", [[1.0, 0.0], [0.5, 0.5]])
def test_a_pixel_range_whose_ends_are_not_in_order_is_refused(
    model_copy: Path, pixel_range: list[float]
) -> None:
    """[1, 0] would invert every image the service reads, with no word of it."""
    edit_card(model_copy, lambda raw: raw["input"].update(pixel_range=pixel_range))
    low, high = (f"{end:g}" for end in pixel_range)
    message = rf"input.pixel_range\n.* \[{low}, {high}\]: its low end must be below its high end"
    with pytest.raises(ModelError, match=message):
        load(model_copy)


def test_card_names_must_be_the_interface(model_copy: Path) -> None:
    edit_card(model_copy, lambda raw: raw["encoder"]["outputs"][0].update(name="mean"))
    with pytest.raises(ModelError, match=r"model.json encoder.outputs: names are \['mean', 'logvar'\]"):
        load(model_copy)


def test_card_shapes_must_agree_with_its_latent_dim(model_copy: Path, card: ModelCard) -> None:
    d = card.latent_dim
    edit_card(model_copy, lambda raw: raw.update(latent_dim=d + 1))
    message = rf"model.json encoder.outputs\[0\].shape is \[None, {d}\] but .* latent_dim {d + 1} make it"
    with pytest.raises(ModelError, match=message):
        load(model_copy)


def test_card_that_disagrees_with_the_graph(model_copy: Path, card: ModelCard) -> None:
    d = card.latent_dim + 1

    def grow_latent(raw: dict[str, Any]) -> None:  # a consistent card, for a model the graph is not
        raw["latent_dim"] = d
        for tensor in [*raw["encoder"]["outputs"], *raw["decoder"]["inputs"]]:
            tensor["shape"] = [None, d]

    edit_card(model_copy, grow_latent)
    message = (
        rf"{card.encoder.file}: model.json encoder.outputs\[0\].shape is \[None, {d}\] but the graph has"
    )
    with pytest.raises(ModelError, match=message):
        load(model_copy)


def test_a_model_exported_before_the_decoder_gave_its_logits_is_refused(model_copy: Path) -> None:
    """Its -log p(x|z) would be computed from float32 means, which are 0 or 1 where the decoder is certain:
    startup says to export it again rather than serve wrong figures."""
    edit_card(model_copy, lambda raw: raw["decoder"].update(outputs=raw["decoder"]["outputs"][:1]))
    message = (
        r"model.json decoder.outputs: names are \['x_mean'\], the interface needs \['x_mean', 'logits'\] "
        r"\(`python -m training export` writes it: export the model again from its checkpoint\)"
    )
    with pytest.raises(ModelError, match=message):
        load(model_copy)


def test_card_input_size_that_disagrees_with_the_graph(model_copy: Path, card: ModelCard) -> None:
    c, h, w = card.input_shape

    def taller(raw: dict[str, Any]) -> None:
        raw["input"]["height"] = h + 1
        raw["encoder"]["inputs"][0]["shape"] = [None, c, h + 1, w]
        for tensor in raw["decoder"]["outputs"]:  # x_mean and logits
            tensor["shape"] = [None, c, h + 1, w]

    edit_card(model_copy, taller)
    with pytest.raises(
        ModelError, match=rf"model.json encoder.inputs\[0\].shape is \[None, {c}, {h + 1}, {w}\]"
    ):
        load(model_copy)


def test_a_graph_of_another_dtype_is_refused(model_copy: Path, card: ModelCard) -> None:
    """A decoder exported in float16, with the names and shapes the card gives: refused at startup, not
    served with every request failing."""
    d, (c, h, w) = card.latent_dim, card.input_shape
    half = onnx.TensorProto.FLOAT16
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("MatMul", ["z", "weights"], ["logits"]),
            onnx.helper.make_node("Sigmoid", ["logits"], ["flat"]),
            onnx.helper.make_node("Reshape", ["flat", "shape"], ["x_mean"]),
        ],
        "half_decoder",
        [onnx.helper.make_tensor_value_info("z", half, ["batch", d])],
        [onnx.helper.make_tensor_value_info("x_mean", half, ["batch", c, h, w])],
        [
            onnx.numpy_helper.from_array(np.zeros((d, c * h * w), dtype=np.float16), "weights"),
            onnx.numpy_helper.from_array(np.array([-1, c, h, w], dtype=np.int64), "shape"),
        ],
    )
    path = model_copy / card.decoder.file
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=10)
    onnx.save(model, str(path))
    edit_card(model_copy, lambda raw: raw["decoder"].update(sha256=sha256_file(path)))
    with pytest.raises(
        ModelError,
        match=r"model.json decoder.inputs\[0\].dtype is float32 but the graph has tensor\(float16\)",
    ):
        load(model_copy)


def test_startup_failure_stops_the_app(model_copy: Path) -> None:
    edit_card(model_copy, lambda raw: raw["decoder"].update(sha256="f" * 64))
    app = create_app(Settings(model_dir=model_copy, providers=CPU))
    with pytest.raises(ModelError, match="decoder.sha256"), TestClient(app):
        pass


def test_require_gpu_stops_the_app(model_dir: Path, cuda_active: bool) -> None:
    if cuda_active:
        pytest.skip("CUDA is active here")
    app = create_app(Settings(model_dir=model_dir, require_gpu=True))
    with pytest.raises(ModelError, match="CUDA is not active"), TestClient(app):
        pass
