"""The committed model card schema, and the committed default model against it."""

from __future__ import annotations

import json

import jsonschema

from service.model_card import json_schema, load_card, sha256_file
from tests.conftest import DEFAULT_MODEL, SCHEMA


def test_committed_schema_is_generated_from_the_card_classes() -> None:
    committed = json.loads(SCHEMA.read_text())
    assert committed == json_schema(), (
        "regenerate: python -m service.model_card > models/model_card.schema.json"
    )


def test_default_model_card_validates_and_hashes_match() -> None:
    jsonschema.validate(
        json.loads((DEFAULT_MODEL / "model.json").read_text()), json.loads(SCHEMA.read_text())
    )
    card = load_card(DEFAULT_MODEL)
    for onnx_file in (card.encoder, card.decoder):
        assert sha256_file(DEFAULT_MODEL / onnx_file.file) == onnx_file.sha256, onnx_file.file
