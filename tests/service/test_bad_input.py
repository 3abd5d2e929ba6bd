"""The bad-input corpus: every kind of bad request gets a 4xx whose detail names the field or the file.

Each case is sent to one app with small limits, in order; after all of them the same app still answers
/ready and a normal request. No detail quotes what was uploaded (`MARKER` sits inside many payloads).
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service import imaging
from service.config import Settings
from service.main import MAX_ERRORS, create_app
from service.model_card import ModelCard
from tests.service.conftest import LIMITS
from tests.service.helpers import b64, detail, digit_png, png, truncated_png

BODY_LIMIT = 256 * 1024
PIXEL_LIMIT = 256 * 256
REQUEST_PIXEL_LIMIT = PIXEL_LIMIT + PIXEL_LIMIT // 2
MARKER = "MARKER-5e1f0c77"
JSON = {"content-type": "application/json"}
D = 16  # the default model's latent_dim


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A 1-bit black PNG of width x height: about 50 kB that would decode to width x height bytes."""
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte, then 8 pixels a byte
    compressor = zlib.compressobj(9)
    rows_per_block = 1000
    data = [compressor.compress(row * rows_per_block) for _ in range(height // rows_per_block)]
    data.append(compressor.compress(row * (height % rows_per_block)) + compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(data)) + chunk(b"IEND", b"")
    )


def jpeg_with_garbage() -> bytes:
    buffer = io.BytesIO()
    from PIL import Image

    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(buffer, format="JPEG")
    head = buffer.getvalue()[:200]
    return head + MARKER.encode() * 20


def upload(name: str, data: bytes, content_type: str = "image/png") -> dict[str, Any]:
    return {"files": [("files", (name, data, content_type))]}


def multipart_body(filename: str, data: bytes) -> bytes:
    """One image file in a part named `files`, as multipart/form-data bytes with the boundary `b`."""
    head = f'--b\r\nContent-Disposition: form-data; name="files"; filename="{filename}"\r\n'
    return head.encode() + b"Content-Type: image/png\r\n\r\n" + data + b"\r\n--b--\r\n"


def latents(*vectors: Any) -> bytes:
    return ('{"latents": [' + ", ".join(str(v) for v in vectors) + "]}").encode()


ZEROS = "[" + ", ".join(["0.0"] * D) + "]"


@dataclass(frozen=True)
class Case:
    """One bad request and what must come back: a detail that starts with `expected`, or for a 422 an
    entry at `loc` whose message starts with `expected`."""

    id: str
    method: str
    url: str
    status: int
    expected: str
    loc: tuple[str | int, ...] | None = None
    request: dict[str, Any] = field(default_factory=dict)


CASES = [
    # Sizes: the body, and the pixels an image would decode to.
    Case(
        "body-content-length",
        "POST",
        "/decode",
        413,
        f"the request body is {BODY_LIMIT + 1} bytes; this server takes at most {BODY_LIMIT} "
        "(VAE_MAX_BODY_BYTES)",
        request={"content": b" " * (BODY_LIMIT + 1), "headers": JSON},
    ),
    Case(
        "body-streamed",
        "POST",
        "/encode",
        413,
        f"the request body is more than {BODY_LIMIT} bytes;",
        request={
            "content": (b"\0" * 65536 for _ in range(8)),
            "headers": {"content-type": "multipart/form-data; boundary=b"},
        },
    ),
    Case(
        "bomb-multipart",
        "POST",
        "/encode",
        413,
        f"file 0 ('bomb.png') has more pixels than the {PIXEL_LIMIT} this server decodes "
        "(VAE_MAX_IMAGE_PIXELS)",
        request=upload("bomb.png", bomb_png()),
    ),
    Case(
        "bomb-json",
        "POST",
        "/reconstruct",
        413,
        "images[0] has more pixels than the",
        request={"json": {"images": [b64(bomb_png())]}},
    ),
    Case(
        "pixels-over-the-setting",
        "POST",
        "/kl",
        413,
        f"file 0 ('wide.png') is 1000x100 pixels, more than the {PIXEL_LIMIT} this server decodes",
        request=upload("wide.png", png(np.zeros((100, 1000), dtype=np.uint8))),
    ),
    Case(
        "pixels-one-over-the-setting",
        "POST",
        "/encode",
        413,
        f"file 0 ('line.png') is {PIXEL_LIMIT + 1}x1 pixels, more than the {PIXEL_LIMIT} this server decodes",
        request=upload("line.png", png(np.zeros((1, PIXEL_LIMIT + 1), dtype=np.uint8))),
    ),
    Case(
        "pixels-of-the-request-over-the-setting",
        "POST",
        "/encode",
        413,
        f"file 1 ('b.png') brings the request's images to {2 * PIXEL_LIMIT} pixels, more than the "
        f"{REQUEST_PIXEL_LIMIT} this server decodes in one request (VAE_MAX_REQUEST_PIXELS)",
        request={
            "files": [
                (
                    "files",
                    (name, png(np.zeros((256, 256), dtype=np.uint8)), "image/png"),
                )
                for name in ("a.png", "b.png")  # each at the limit of one image
            ]
        },
    ),
    Case(
        # The second image is cut short after its header: refused from the header, it is never decoded
        # (decoding it would have been a 400 for the truncation).
        "pixels-of-the-request-over-the-setting-from-the-header",
        "POST",
        "/encode",
        413,
        f"file 1 ('cut.png') brings the request's images to {2 * PIXEL_LIMIT} pixels, more than the",
        request={
            "files": [
                ("files", ("a.png", png(np.zeros((256, 256), dtype=np.uint8)), "image/png")),
                ("files", ("cut.png", bomb_png(256, 256)[:60], "image/png")),
            ]
        },
    ),
    Case(
        "bomb-interpolate",
        "POST",
        "/interpolate?steps=4",
        413,
        f"file 1 ('b.png') is 5000x5000 pixels, more than the {PIXEL_LIMIT} this server decodes",
        request={
            "files": [
                ("files", ("a.png", digit_png(0), "image/png")),
                ("files", ("b.png", bomb_png(5000, 5000), "image/png")),
            ]
        },
    ),
    # Counts past the settings.
    Case(
        "images-per-request",
        "POST",
        "/encode",
        422,
        "more than 2 images sent; this server takes at most 2 per request",
        loc=("body", "files"),
        request={"files": [("files", (f"{i}.png", digit_png(i), "image/png")) for i in range(3)]},
    ),
    Case(
        "images-per-request-json",
        "POST",
        "/encode",
        422,
        "3 images sent; this server takes at most 2",
        loc=("body", "images"),
        request={"json": {"images": [b64(digit_png(i)) for i in range(3)]}},
    ),
    Case(
        "n",
        "GET",
        "/sample?n=4",
        422,
        "n is 4; this server allows at most 3 (VAE_MAX_LATENTS)",
        ("query", "n"),
    ),
    Case(
        "n-of-a-thousand-digits",
        "GET",
        "/sample?n=" + "9" * 1000,
        422,
        "n is 999999999999... (1000 digits); this server allows at most 3 (VAE_MAX_LATENTS)",
        ("query", "n"),
    ),
    Case("n-zero", "GET", "/sample?n=0", 422, "Input should be greater than or equal to 1", ("query", "n")),
    Case(
        "samples",
        "POST",
        "/encode?samples=3",
        422,
        "samples is 3; this server allows at most 2 (VAE_MAX_SAMPLES)",
        ("query", "samples"),
        upload("a.png", digit_png(0)),
    ),
    Case(
        "steps",
        "POST",
        "/interpolate?steps=5",
        422,
        "steps is 5; this server allows at most 4 (VAE_MAX_STEPS)",
        ("query", "steps"),
        {"content": latents(ZEROS, ZEROS), "headers": JSON},
    ),
    Case(
        "steps-one",
        "POST",
        "/interpolate?steps=1",
        422,
        "Input should be greater than or equal to 2",
        ("query", "steps"),
        {"content": latents(ZEROS, ZEROS), "headers": JSON},
    ),
    Case(
        "latents-per-request",
        "POST",
        "/decode",
        422,
        "4 vectors sent; this server takes at most 3 per request",
        ("body", "latents"),
        {"content": latents(ZEROS, ZEROS, ZEROS, ZEROS), "headers": JSON},
    ),
    # Files that are not readable images.
    Case(
        "zero-byte",
        "POST",
        "/encode",
        400,
        "file 0 ('empty.png') is empty (0 bytes)",
        request=upload("empty.png", b""),
    ),
    Case(
        "not-an-image",
        "POST",
        "/encode",
        400,
        "file 0 ('notes.txt') is not an image format Pillow can read",
        request=upload("notes.txt", f"{MARKER}: my notes".encode(), "text/plain"),
    ),
    Case(
        "corrupt-png",
        "POST",
        "/reconstruct",
        400,
        "file 0 ('corrupt.png') is not an image format Pillow can read",
        request=upload("corrupt.png", b"\x89PNG\r\n\x1a\n" + MARKER.encode() * 10),
    ),
    Case(
        "truncated-png",
        "POST",
        "/encode",
        400,
        "file 0 ('truncated.png') cannot be decoded (its image data holds 514 of the 1056 bytes its 32x32 "
        "pixels take: truncated)",
        request=upload("truncated.png", truncated_png()),
    ),
    Case(
        "corrupt-jpeg",
        "POST",
        "/kl",
        400,
        "file 0 ('photo.jpg') cannot be decoded",
        request=upload("photo.jpg", jpeg_with_garbage(), "image/jpeg"),
    ),
    Case(
        "not-an-image-json",
        "POST",
        "/encode",
        400,
        "images[0] is not an image format Pillow can read",
        request={"json": {"images": [b64(MARKER.encode())]}},
    ),
    Case(
        "not-base64",
        "POST",
        "/encode",
        422,
        "Value error, not valid base64",
        ("body", "images", 0),
        {"json": {"images": [MARKER + "!"]}},
    ),
    # Content types.
    Case(
        "text-plain",
        "POST",
        "/encode",
        415,
        "content type 'text/plain' is not supported here; send application/json or multipart/form-data",
        request={"content": MARKER.encode(), "headers": {"content-type": "text/plain"}},
    ),
    Case(
        "no-content-type",
        "POST",
        "/decode",
        415,
        "content type '(none)' is not supported here; send application/json",
        request={"content": latents(ZEROS)},
    ),
    Case(
        "form-urlencoded",
        "POST",
        "/kl",
        415,
        "content type 'application/x-www-form-urlencoded' is not supported here",
        request={"data": {"mu": MARKER}},
    ),
    Case(
        "multipart-to-json-only",
        "POST",
        "/decode",
        415,
        "content type 'multipart/form-data' is not supported here; send application/json",
        request=upload("a.png", digit_png(0)),
    ),
    Case(
        "raw-png-body",
        "POST",
        "/reconstruct",
        415,
        "content type 'image/png' is not supported here",
        request={"content": digit_png(0), "headers": {"content-type": "image/png"}},
    ),
    # Multipart that is not what the endpoints read.
    Case(
        "multipart-no-boundary",
        "POST",
        "/encode",
        400,
        "the content type has no boundary: send multipart/form-data; boundary=<the parts' separator>",
        request={"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}},
    ),
    Case(
        "multipart-garbage",
        "POST",
        "/encode",
        400,
        "the body is not valid multipart/form-data: no boundary ('--x') in the body",
        request={"content": MARKER.encode(), "headers": {"content-type": "multipart/form-data; boundary=x"}},
    ),
    Case(
        "multipart-no-boundary-in-sight",
        "POST",
        "/encode",
        400,
        "the body is not valid multipart/form-data: no boundary in the first 1024 bytes",
        request={
            "content": MARKER.encode() * 100 + b"\r\n--x\r\n",
            "headers": {"content-type": "multipart/form-data; boundary=x"},
        },
    ),
    Case(
        "files-as-text",
        "POST",
        "/encode",
        422,
        "files[0] is a text field, not a file",
        ("body", "files", 0),
        {"data": {"files": MARKER}, "files": [("other", ("a.png", b"x", "image/png"))]},
    ),
    *(
        Case(
            f"two-content-dispositions-{order}",
            "POST",
            "/encode",
            400,
            "multipart part 0 has 2 Content-Disposition headers; send one",
            request={
                "content": b"--x\r\n"
                + b"".join(
                    b'Content-Disposition: form-data; name="%s"; filename="a.png"\r\n' % name
                    for name in names
                )
                + b"\r\n"
                + digit_png(0)
                + b"\r\n--x--\r\n",
                "headers": {"content-type": "multipart/form-data; boundary=x"},
            },
        )
        # Whichever comes first: a parser that keeps the last one served the image named "other" first.
        for order, names in (("other-first", (b"other", b"files")), ("files-first", (b"files", b"other")))
    ),
    Case(
        "part-of-another-name",
        "POST",
        "/reconstruct",
        422,
        "part 0 is named 'image'; this endpoint reads image files in parts named 'files'",
        ("body", "image"),
        {"files": [("image", ("a.png", digit_png(0), "image/png"))]},
    ),
    # JSON that does not parse, or not as the schema says.
    Case(
        "malformed-json",
        "POST",
        "/decode",
        422,
        "Invalid JSON: EOF while parsing",
        ("body",),
        {"content": b'{"latents": [[0.0,', "headers": JSON},
    ),
    Case(
        "empty-json",
        "POST",
        "/decode",
        422,
        "Invalid JSON: EOF while parsing a value",
        ("body",),
        {"content": b"", "headers": JSON},
    ),
    Case(
        "json-not-an-object",
        "POST",
        "/kl",
        422,
        "Input should be an object",
        ("body",),
        {"content": b"[1, 2]", "headers": JSON},
    ),
    Case(
        "latents-a-string",
        "POST",
        "/decode",
        422,
        "Input should be a valid array",
        ("body", "latents"),
        {"json": {"latents": MARKER}},
    ),
    Case(
        "strings-for-numbers",
        "POST",
        "/decode",
        422,
        "Input should be a valid number",
        ("body", "latents", 0, 1),
        {"json": {"latents": [[0.0, "1.5"] + [0.0] * (D - 2)]}},
    ),
    Case(
        "bool-for-number",
        "POST",
        "/interpolate?steps=4",
        422,
        "Input should be a valid number",
        ("body", "latents", 1, 0),
        {"json": {"latents": [[0.0] * D, [True] + [0.0] * (D - 1)]}},
    ),
    Case(
        "nan",
        "POST",
        "/decode",
        422,
        "Input should be a finite number",
        ("body", "latents", 0, 0),
        {"content": latents("[NaN" + ", 0.0" * (D - 1) + "]"), "headers": JSON},
    ),
    Case(
        "infinity",
        "POST",
        "/decode",
        422,
        "Input should be a finite number",
        ("body", "latents", 0, 2),
        {"content": latents("[0.0, 0.0, -Infinity" + ", 0.0" * (D - 3) + "]"), "headers": JSON},
    ),
    Case(
        "overflow-to-infinity",
        "POST",
        "/kl",
        422,
        "Input should be a finite number",
        ("body", "mu", 0),
        {
            "content": ('{"mu": [1e999' + ", 0.0" * (D - 1) + '], "logvar": ' + ZEROS + "}").encode(),
            "headers": JSON,
        },
    ),
    Case(
        "nan-in-query",
        "GET",
        "/sample?n=2&temperature=nan",
        422,
        "Input should be a finite number",
        ("query", "temperature"),
    ),
    Case(
        "logvar-out-of-range",
        "POST",
        "/kl",
        422,
        "Input should be less than or equal to 100",
        ("body", "logvar", 0),
        {"json": {"mu": [0.0] * D, "logvar": [1000.0] + [0.0] * (D - 1)}},
    ),
    Case(
        "wrong-latent-length",
        "POST",
        "/decode",
        422,
        "latent 1 has 3 values; this model takes 16",
        ("body", "latents", 1),
        {"json": {"latents": [[0.0] * D, [0.0] * 3]}},
    ),
    Case(
        "empty-latents",
        "POST",
        "/decode",
        422,
        "List should have at least 1 item",
        ("body", "latents"),
        {"json": {"latents": []}},
    ),
    Case(
        "unknown-field",
        "POST",
        "/decode",
        422,
        "Extra inputs are not permitted",
        ("body", "extra"),
        {"json": {"latents": [[0.0] * D], "extra": MARKER}},
    ),
    # A key given twice: parsers keep the last value and drop the first without a word.
    Case(
        "repeated-key",
        "POST",
        "/decode",
        422,
        "the key 'latents' appears twice in one JSON object; send each key once",
        ("body",),
        {"content": f'{{"latents": [{ZEROS}], "latents": [{ZEROS}, {ZEROS}]}}', "headers": JSON},
    ),
    Case(
        "repeated-key-nested",
        "POST",
        "/kl",
        422,
        "the key 'mu' appears twice in one JSON object",
        ("body",),
        {
            "content": f'{{"mu": {ZEROS}, "logvar": {ZEROS}, "target": {{"mu": {ZEROS}, "mu": {ZEROS}, '
            f'"logvar": {ZEROS}}}}}',
            "headers": JSON,
        },
    ),
    Case(
        "repeated-key-escaped",
        "POST",
        "/encode",
        422,
        "the key 'images' appears twice in one JSON object",
        ("body",),
        {
            "content": b'{"images": ["' + b64(digit_png()).encode() + b'"], "\\u0069mages": []}',
            "headers": JSON,
        },
    ),
    Case(
        "nested-garbage",
        "POST",
        "/kl",
        422,
        "Input should be a valid number",
        ("body", "mu", 0),
        {"json": {"mu": [{"a": [1, {"b": [None, MARKER]}]}] + [0.0] * (D - 1), "logvar": [0.0] * D}},
    ),
    Case(
        "deep-nesting",
        "POST",
        "/decode",
        422,
        "Invalid JSON: recursion limit exceeded",
        ("body",),
        {"content": b'{"latents": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "headers": JSON},
    ),
    # Very long strings: named, cut or refused, never echoed.
    Case(
        "long-string-for-latents",
        "POST",
        "/decode",
        422,
        "Input should be a valid array",
        ("body", "latents"),
        {"json": {"latents": MARKER * 10_000}},
    ),
    Case(
        "long-base64-image",
        "POST",
        "/encode",
        400,
        "images[0] is not an image format Pillow can read",
        request={"json": {"images": ["QUFB" * 40_000]}},
    ),
    Case(
        "long-query-value",
        "GET",
        f"/sample?n=2&format={MARKER * 300}",
        422,
        "Input should be 'png', 'array', 'grid' or 'npy'",
        ("query", "format"),
    ),
    Case(
        "query-not-a-number",
        "GET",
        f"/sample?n={MARKER}",
        422,
        "Input should be a valid integer",
        ("query", "n"),
    ),
    Case(
        "long-file-name",
        "POST",
        "/encode",
        400,
        "file 0 ('" + "n" * 64 + "'...) is not an image format Pillow can read",
        request=upload("n" * 1000, MARKER.encode()),
    ),
    # Compressed bodies: refused by their Content-Encoding, never misread as bad JSON or multipart, and a
    # plain body labelled compressed is not taken either.
    Case(
        "gzip-json",
        "POST",
        "/decode",
        415,
        "Content-Encoding 'gzip' is not supported; send the body uncompressed (this server takes only "
        "identity bodies)",
        request={
            "content": gzip.compress(latents(ZEROS)),
            "headers": {**JSON, "content-encoding": "gzip"},
        },
    ),
    Case(
        "gzip-multipart",
        "POST",
        "/encode",
        415,
        "Content-Encoding 'gzip' is not supported;",
        request={
            "content": gzip.compress(multipart_body("a.png", digit_png(0))),
            "headers": {"content-type": "multipart/form-data; boundary=b", "content-encoding": "gzip"},
        },
    ),
    Case(
        "plain-json-labelled-br",
        "POST",
        "/kl",
        415,
        "Content-Encoding 'br' is not supported;",
        request={"json": {"mu": [0.0] * D, "logvar": [0.0] * D}, "headers": {"content-encoding": "br"}},
    ),
    Case(
        "plain-json-labelled-gzip-after-identity",
        "POST",
        "/interpolate",
        415,
        "Content-Encoding 'identity, GZIP' is not supported;",
        request={
            "json": {"latents": [[0.0] * D, [1.0] * D]},
            "headers": {"content-encoding": "identity, GZIP"},
        },
    ),
    Case(
        "plain-multipart-labelled-gzip",
        "POST",
        "/reconstruct",
        415,
        "Content-Encoding 'gzip' is not supported;",
        request={**upload("a.png", digit_png(0)), "headers": {"content-encoding": "gzip"}},
    ),
]


@pytest.fixture(scope="module")
def strict(settings: Settings) -> Iterator[TestClient]:
    """One app with small limits for the whole corpus."""
    update = {
        **LIMITS,
        "max_body_bytes": BODY_LIMIT,
        "max_image_pixels": PIXEL_LIMIT,
        "max_request_pixels": REQUEST_PIXEL_LIMIT,
    }
    with TestClient(create_app(settings.model_copy(update=update))) as client:
        yield client


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_a_4xx_naming_the_field(strict: TestClient, case: Case) -> None:
    response = strict.request(case.method, case.url, **case.request)
    if case.loc is None:
        assert detail(response, case.status).startswith(case.expected), response.text
    else:
        entries = detail(response, 422)
        first = entries[0]
        assert tuple(first["loc"]) == case.loc and first["msg"].startswith(case.expected), response.text
        assert all(set(entry) == {"type", "loc", "msg"} for entry in entries)
    assert MARKER not in response.text
    assert len(response.content) < 4000


def test_the_server_still_serves_after_the_corpus(strict: TestClient, card: ModelCard) -> None:
    for case in CASES:  # the whole corpus on this app, whichever of the tests above ran
        assert 400 <= strict.request(case.method, case.url, **case.request).status_code < 500, case.id
    assert strict.get("/ready").status_code == 200
    encoded = strict.post("/encode", files={"files": ("a.png", digit_png(0), "image/png")})
    assert encoded.status_code == 200
    assert len(encoded.json()["mu"][0]) == card.latent_dim
    assert strict.get("/sample?n=3&format=grid").headers["content-type"] == "image/png"


def test_pillow_guard_backs_up_the_setting() -> None:
    """Without a limit of the service's own, Pillow's guard still refuses the bomb, before decoding it."""
    from service.model_card import InputSpec

    spec = InputSpec(channels=1, height=8, width=8, foreground="light")
    with pytest.raises(
        imaging.ImageTooLarge, match=r"is too large to decode \(Image size \(400000000 pixels\)"
    ):
        imaging.read_pixels(bomb_png(), spec)


# Many errors: a 422 lists the first MAX_ERRORS and counts the rest; a body of far more values than any
# request within the limits holds is refused before pydantic builds an error for each.


def test_a_422_lists_the_first_errors_and_counts_the_rest(strict: TestClient) -> None:
    count = 3 * D  # every value of three latents is a string
    entries = detail(strict.post("/decode", json={"latents": [["x"] * D] * 3}), 422)
    assert entries[:MAX_ERRORS] == [
        {
            "type": "float_type",
            "loc": ["body", "latents", i // D, i % D],
            "msg": "Input should be a valid number",
        }
        for i in range(MAX_ERRORS)
    ]
    assert entries[MAX_ERRORS:] == [
        {
            "type": "too_many_errors",
            "loc": ["body", "latents"],
            "msg": f"and {count - MAX_ERRORS} more errors, not listed: a 422 lists the first {MAX_ERRORS}",
        }
    ]


def test_errors_found_after_validation_are_capped_too(client: TestClient) -> None:
    """The route's own checks (here each latent's length) go through the same cap."""
    entries = detail(client.post("/decode", json={"latents": [[0.0] * 3] * (MAX_ERRORS + 1)}), 422)
    assert [entry["msg"] for entry in entries[:MAX_ERRORS]] == [
        f"latent {i} has 3 values; this model takes {D}" for i in range(MAX_ERRORS)
    ]
    assert entries[MAX_ERRORS:] == [
        {
            "type": "too_many_errors",
            "loc": ["body", "latents", MAX_ERRORS],
            "msg": f"and 1 more error, not listed: a 422 lists the first {MAX_ERRORS}",
        }
    ]


@pytest.mark.parametrize(
    ("url", "field", "around"),
    [("/decode", "latents", ("[[", "]]")), ("/kl", "mu", ("[", "]")), ("/encode", "images", ("[", "]"))],
    ids=["read-json", "read-body", "images"],
)
def test_far_more_values_than_the_limits_are_refused_unvalidated(
    strict: TestClient, url: str, field: str, around: tuple[str, str]
) -> None:
    # 60 000 strings in 240 kB, within the body limit. The most a request within LIMITS holds: the mu and
    # logvar of 3 posteriors and a target, and 2 images; twice that is refused.
    values = ",".join(['"x"'] * 60_000)
    body = f'{{"{field}": {around[0]}{values}{around[1]}}}'.encode()
    most = 2 * (2 * (LIMITS["max_latents"] + 1) * D + 2 * LIMITS["max_images"])
    response = strict.post(url, content=body, headers=JSON)
    assert detail(response, 422) == [
        {
            "type": "too_many_values",
            "loc": ["body"],
            "msg": f"the body holds more than {most} values; requests within this server's limits "
            f"(VAE_MAX_LATENTS, VAE_MAX_IMAGES) hold at most {most // 2}",
        }
    ]


def test_sixteen_mib_of_wrong_values_is_refused_unvalidated(client: TestClient) -> None:
    """4 194 000 strings for numbers, the most the default body limit takes: validated one by one, they took
    30 s of the event loop, 6 GB and a 400 MB answer of an error each; refused as a whole, 0.03 s."""
    body = b'{"latents": [[' + b",".join([b'"x"'] * 4_194_000) + b"]]}"
    response = client.post("/decode", content=body, headers=JSON)
    assert [entry["type"] for entry in detail(response, 422)] == ["too_many_values"]
    assert len(response.content) < 400


def test_identity_is_no_content_encoding(strict: TestClient) -> None:
    headers = {"content-encoding": "Identity"}
    assert strict.post("/decode", json={"latents": [[0.0] * D]}, headers=headers).status_code == 200
    encoded = strict.post("/encode", files={"files": ("a.png", digit_png(0), "image/png")}, headers=headers)
    assert encoded.status_code == 200


LONG = "n" * 5000
V2_Z = {"name": "z", "shape": [1, D], "datatype": "FP32", "data": [0.0] * D}


@pytest.mark.parametrize(
    ("method", "url", "sent", "status", "start"),
    [
        ("GET", f"/v2/models/{LONG}", {}, 404, "model 'nnnn"),
        ("GET", f"/static/{LONG}.css", {}, 404, "no static file 'nnnn"),
        ("POST", "/decode", {"content": b"{}", "headers": {"content-type": LONG}}, 415, "content type 'nnnn"),
        (
            "POST",
            "/v2/models/decoder/infer",
            {"json": {"inputs": [{**V2_Z, "name": LONG}]}},
            422,
            "inputs are",
        ),
        (
            "POST",
            "/v2/models/decoder/infer",
            {"json": {"inputs": [V2_Z] * 20}},
            422,
            "inputs are 'z', 'z', 'z', 'z' and 16 more;",
        ),
        (
            "POST",
            "/v2/models/decoder/infer",
            {"json": {"inputs": [V2_Z], "outputs": [{"name": LONG}]}},
            422,
            "outputs[0].name is 'nnnn",
        ),
        (
            "POST",
            "/v2/models/decoder/infer",
            {"json": {"inputs": [V2_Z], "parameters": {"binary_data_output": [LONG]}}},
            400,
            "request.parameters.binary_data_output is ['nnnn",
        ),
    ],
    ids=[
        "v2-model",
        "static-file",
        "content-type",
        "v2-input-name",
        "v2-many-inputs",
        "v2-output",
        "v2-flag",
    ],
)
def test_a_detail_quotes_at_most_the_start_of_long_client_text(
    client: TestClient, method: str, url: str, sent: dict[str, Any], status: int, start: str
) -> None:
    """A 5000-character name (or 20 inputs) in the request: the detail names it by its start, not whole."""
    response = client.request(method, url, **sent)
    assert response.status_code == status, response.text
    message = response.json().get("detail", response.json().get("error"))
    assert message.startswith(start)
    assert len(message) < 200
