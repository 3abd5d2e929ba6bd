"""The OpenAPI schema bounds what this server bounds: options by its settings, latents by its model."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.options import MAXIMUM_SETTING
from service.config import Settings
from service.main import create_app
from service.model_card import ModelCard
from service.schemas import LATENT_DIM, MAX_ITEMS_SETTING

# Valid settings, none of them the default: a maximum that is documented is this server's.
BOUNDS = {"max_latents": 20, "max_images": 7, "max_samples": 5, "max_steps": 12, "max_scale": 3}


@pytest.fixture(scope="module")
def bounded(settings: Settings) -> TestClient:
    """An app with `BOUNDS`, its lifespan not run: no model is loaded."""
    return TestClient(create_app(Settings.model_validate(settings.model_dump() | BOUNDS)))


def parameter(schema: dict[str, Any], path: str, method: str, name: str) -> dict[str, Any]:
    parameters = schema["paths"][path][method]["parameters"]
    found: dict[str, Any] = next(parameter for parameter in parameters if parameter["name"] == name)
    return found


def body(schema: dict[str, Any], path: str) -> dict[str, Any]:
    content = schema["paths"][path]["post"]["requestBody"]["content"]
    found: dict[str, Any] = content["application/json"]["schema"]
    return found


def latents(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every latent vector's schema in the JSON bodies, by where it is."""
    kl = body(schema, "/kl")["properties"]
    target = next(branch for branch in kl["target"]["anyOf"] if branch.get("type") == "object")
    found = {
        "decode latents": body(schema, "/decode")["properties"]["latents"]["items"],
        "interpolate latents": body(schema, "/interpolate")["properties"]["latents"]["items"],
        "kl target mu": target["properties"]["mu"],
        "kl target logvar": target["properties"]["logvar"],
    }
    for name in ("mu", "logvar"):
        one, batch = kl[name]["oneOf"]
        found |= {f"kl {name}": one, f"kl {name} batch": batch["items"]}
    return found


def keys(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set(node).union(*(keys(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(keys(item) for item in node))
    return set()


@pytest.mark.parametrize(
    ("path", "method", "name", "setting"),
    [
        ("/sample", "get", "n", "max_latents"),
        ("/encode", "post", "samples", "max_samples"),
        ("/interpolate", "post", "steps", "max_steps"),
        ("/sample", "get", "scale", "max_scale"),
        ("/decode", "post", "scale", "max_scale"),
        ("/reconstruct", "post", "scale", "max_scale"),
        ("/interpolate", "post", "scale", "max_scale"),
    ],
)
def test_an_option_bounded_by_a_setting_documents_its_value(
    bounded: TestClient, path: str, method: str, name: str, setting: str
) -> None:
    """The schema has the maximum the route refuses past, the running server's, besides the static minimum."""
    schema = parameter(bounded.get("/openapi.json").json(), path, method, name)["schema"]
    assert schema["maximum"] == BOUNDS[setting]
    assert schema["minimum"] in (0, 1, 2)


def multipart_files(schema: dict[str, Any], path: str) -> dict[str, Any]:
    content = schema["paths"][path]["post"]["requestBody"]["content"]
    found: dict[str, Any] = content["multipart/form-data"]["schema"]["properties"]["files"]
    return found


def test_lists_of_latents_and_images_document_the_most_a_request_takes(bounded: TestClient) -> None:
    """A client generated from the schema splits its batches by maxItems instead of learning it from 422s."""
    schema = bounded.get("/openapi.json").json()
    kl = body(schema, "/kl")["properties"]
    lists = {
        "decode latents": (body(schema, "/decode")["properties"]["latents"], 1, BOUNDS["max_latents"]),
        "kl mu batch": (kl["mu"]["oneOf"][1], 1, BOUNDS["max_latents"]),
        "kl logvar batch": (kl["logvar"]["oneOf"][1], 1, BOUNDS["max_latents"]),
        "interpolate latents": (body(schema, "/interpolate")["properties"]["latents"], 2, 2),
        "interpolate files": (multipart_files(schema, "/interpolate"), 2, 2),
    }
    for path in ("/encode", "/reconstruct"):
        lists[f"{path} images"] = (body(schema, path)["properties"]["images"], 1, BOUNDS["max_images"])
    for path in ("/encode", "/reconstruct", "/kl"):
        lists[f"{path} files"] = (multipart_files(schema, path), 1, BOUNDS["max_images"])
    for where, (array, least, most) in lists.items():
        assert (array["type"], array["minItems"], array["maxItems"]) == ("array", least, most), where


@pytest.mark.parametrize(("path", "method"), [("/sample", "get"), ("/encode", "post")])
def test_seed_is_documented_as_what_a_query_can_carry(client: TestClient, path: str, method: str) -> None:
    """`?seed=null` and `?seed=` are 422s: null is not a value to document (leaving seed out is)."""
    seed = parameter(client.get("/openapi.json").json(), path, method, "seed")
    assert seed["schema"] == {
        "type": "integer",
        "minimum": 0,
        "title": "Seed",
        "description": seed["description"],
    }
    assert seed["description"].startswith("Seeds the random draws")


def test_latents_are_documented_as_long_as_the_model_takes(client: TestClient, card: ModelCard) -> None:
    found = latents(client.get("/openapi.json").json())
    assert card.latent_dim == 16
    for where, vector in found.items():
        assert (vector["type"], vector["minItems"], vector.get("maxItems")) == ("array", 16, 16), where


def test_a_schema_built_before_the_model_loads_is_built_again(settings: Settings) -> None:
    """Before the lifespan has run the length is not known, and is left open rather than guessed."""
    app_client = TestClient(create_app(settings))
    for where, vector in latents(app_client.get("/openapi.json").json()).items():
        assert vector["minItems"] == 1 and "maxItems" not in vector, where
    with app_client:
        for where, vector in latents(app_client.get("/openapi.json").json()).items():
            assert vector["minItems"] == vector["maxItems"] == 16, where


def test_no_marker_is_served(client: TestClient, bounded: TestClient) -> None:
    for app_client in (client, bounded, client):  # asked again: the schema is the same
        assert not {MAXIMUM_SETTING, MAX_ITEMS_SETTING, LATENT_DIM} & keys(
            app_client.get("/openapi.json").json()
        )
    assert client.get("/openapi.json").json() == client.get("/openapi.json").json()
