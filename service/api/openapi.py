"""The OpenAPI schema's bounds that only the running server knows: its VAE_MAX_* settings and the loaded
model's latent_dim.

The routes' schemas are written when their modules are imported, before there are settings or a model: a
bound that comes from either is a marker there: `MAXIMUM_SETTING` on a query option, `MAX_ITEMS_SETTING` on a
list of latents or images and `LATENT_DIM` on a latent vector. The schema served has them replaced: `maximum`
and `maxItems` are the setting's value, and a latent's
`minItems` and `maxItems` are the model's latent_dim once the lifespan has loaded it (`describe_model`;
before, its length is left open). Without them, clients generated from the schema, and schemathesis, send
values the routes refuse.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from service.api.bodies import named_examples
from service.api.options import MAXIMUM_SETTING
from service.config import Settings
from service.schemas import LATENT_DIM, LATENT_EXAMPLES, MAX_ITEMS_SETTING, SIZED_EXAMPLES

__all__ = ["describe_model", "edit_on_build", "install"]


def install(app: FastAPI, settings: Settings) -> None:
    """Serve `app`'s OpenAPI schema with the markers replaced by `settings`' values and the model's
    latent_dim."""
    edit_on_build(
        app, lambda schema: _replace_markers(schema, settings, getattr(app.state, "latent_dim", None))
    )


def edit_on_build(app: FastAPI, edit: Callable[[dict[str, Any]], None]) -> None:
    """Have `edit` change `app`'s OpenAPI schema when FastAPI builds it (at the first request for it, and
    again after `describe_model`), not at every request: FastAPI keeps the schema it built."""
    build = app.openapi

    def generate() -> dict[str, Any]:
        fresh = app.openapi_schema is None
        schema = build()
        if fresh:
            edit(schema)
        return schema

    app.openapi = generate  # type: ignore[method-assign]


def describe_model(app: FastAPI, latent_dim: int) -> None:
    """Document latents as `latent_dim` numbers: the schema is built again when it is next asked for."""
    app.state.latent_dim = latent_dim
    app.openapi_schema = None


def _replace_markers(node: Any, settings: Settings, latent_dim: int | None) -> None:
    if isinstance(node, dict):
        for marker, bound in ((MAXIMUM_SETTING, "maximum"), (MAX_ITEMS_SETTING, "maxItems")):
            setting = node.pop(marker, None)
            if setting is not None:
                node[bound] = getattr(settings, setting)
        if node.pop(LATENT_DIM, False) and latent_dim is not None:
            node["minItems"] = node["maxItems"] = latent_dim
        request = node.pop(SIZED_EXAMPLES, None)
        if request is not None and latent_dim is not None:
            node["schema"]["examples"] = examples = LATENT_EXAMPLES[request](latent_dim)
            node["examples"] = named_examples(examples)
        for value in node.values():
            _replace_markers(value, settings, latent_dim)
    elif isinstance(node, list):
        for item in node:
            _replace_markers(item, settings, latent_dim)
