"""POST /encode: multipart or base64 JSON images -> mu, logvar, kl and z."""

from __future__ import annotations

import io
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service import gaussian, imaging
from service.api import bodies
from service.model_card import InputSpec, ModelCard
from service.schemas import EncodeResponse
from tests.service.conftest import LIMITS
from tests.service.helpers import (
    b64,
    body,
    decoded_png,
    detail,
    digit_png,
    files,
    messages,
    png,
    truncated_png,
)


def test_one_image(client: TestClient, card: ModelCard) -> None:
    result = body(client.post("/encode", files=files(digit_png(0))), EncodeResponse)
    assert np.shape(result.mu) == np.shape(result.logvar) == (1, card.latent_dim)
    assert result.z is None
    expected_kl = gaussian.kl_to_prior(result.mu, result.logvar).sum(axis=1)
    # mu and logvar went through float32 and JSON; the KL was summed from the unrounded float32 values.
    np.testing.assert_allclose(result.kl, expected_kl, rtol=1e-6)


def test_many_images_keep_their_order(client: TestClient) -> None:
    together = body(
        client.post("/encode", files=files(digit_png(0), digit_png(1), digit_png(2))), EncodeResponse
    )
    alone = [body(client.post("/encode", files=files(digit_png(i))), EncodeResponse).mu[0] for i in range(3)]
    # Batch vs single: the sums may run in another order for another batch size (on CUDA, ~2e-7).
    np.testing.assert_allclose(together.mu, alone, rtol=0, atol=1e-6)


def test_large_images_are_decoded_while_other_requests_are_answered(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One request's large images must not stall the server: they are decoded off the event loop."""
    started, finished = threading.Event(), threading.Event()
    stalled: list[bool] = []
    read_pixels = imaging.read_pixels
    side = 512

    def slow(data: bytes, spec: InputSpec, *, max_pixels: int, **kwargs: Any) -> imaging.Floats:
        if max_pixels >= side * side:  # the decode itself (the event loop's try stops at the header)
            started.set()
            # On the event loop this would hold the /health below until the wait runs out.
            stalled.append(not finished.wait(timeout=10))
        return read_pixels(data, spec, max_pixels=max_pixels, **kwargs)

    monkeypatch.setattr(imaging, "read_pixels", slow)
    large = png(np.zeros((side, side), dtype=np.uint8))
    with ThreadPoolExecutor(1) as pool:
        upload = pool.submit(client.post, "/encode", files=files(large))
        assert started.wait(timeout=10)
        assert client.get("/health").status_code == 200
        finished.set()
        assert upload.result().status_code == 200
    assert stalled == [False]


def decoding_threads(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, *images: bytes, status: int = 200
) -> list[bool]:
    """For each image read while /encode reads `images`: whether it was on the image-decoding thread."""
    threads: list[bool] = []
    read_pixels = imaging.read_pixels

    def recorded(*args: Any, **kwargs: Any) -> imaging.Floats:
        threads.append(threading.current_thread().name.startswith("image-decoding"))
        return read_pixels(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(imaging, "read_pixels", recorded)
        response = client.post("/encode", files=files(*images))
    assert response.status_code == status, response.text
    return threads


def padded(data: bytes, size: int) -> bytes:
    """A PNG with a private ancillary chunk of `size` zero bytes after IHDR (decoders skip it)."""
    kind, payload = b"prVt", bytes(size)
    chunk = struct.pack(">I", size) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return data[:33] + chunk + data[33:]


def test_small_requests_are_decoded_on_the_loop_and_others_on_the_decoding_thread(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past imaging.SMALL_PIXELS together, or bodies.INLINE_BYTES, the request goes to the decoding thread:
    from the first image whose header says too much, and from the start when the files are too long. Each
    reads as on the loop, in the same order."""
    tiles = [png(np.kron(decoded_png(digit_png(i)), np.ones((8, 8), dtype=np.uint8))) for i in range(17)]
    assert 17 * 64 * 64 > imaging.SMALL_PIXELS >= 16 * 64 * 64
    assert sum(map(len, tiles)) < bodies.INLINE_BYTES
    assert decoding_threads(client, monkeypatch, *tiles[:16]) == [False] * 16
    assert decoding_threads(client, monkeypatch, *tiles) == [False] * 17 + [True] * 17
    long = padded(tiles[0], bodies.INLINE_BYTES)
    assert decoding_threads(client, monkeypatch, long) == [True]

    together = body(client.post("/encode", files=files(*tiles, long)), EncodeResponse)
    alone = [body(client.post("/encode", files=files(tile)), EncodeResponse).mu[0] for tile in tiles]
    # Batch vs single: the sums may run in another order for another batch size (on CUDA, ~2e-7).
    np.testing.assert_allclose(together.mu, [*alone, alone[0]], rtol=0, atol=1e-6)


def test_a_header_that_understates_the_size_does_not_hold_the_loop(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PNG whose first IHDR says 1 x 1 and a second the real 300 x 300: libspng refuses it, Pillow reads
    the last one; the loop stops at that header and the image is decoded on the thread, as its twin with
    one IHDR."""
    honest = png(np.arange(300 * 300, dtype=np.uint32).reshape(300, 300).astype(np.uint8))
    tiny_header = struct.pack(">I4sIIBBBBB", 13, b"IHDR", 1, 1, 8, 0, 0, 0, 0)
    tiny_header += struct.pack(">I", zlib.crc32(tiny_header[4:]))
    twice = honest[:8] + tiny_header + honest[8:]
    assert decoding_threads(client, monkeypatch, twice) == [False, True]
    assert (
        client.post("/encode", files=files(twice)).content
        == client.post("/encode", files=files(honest)).content
    )


def test_a_format_whose_header_does_not_bound_the_decode_is_read_on_the_thread(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ICNS block names its size (icp4: 16 x 16) and holds a PNG of any other: the event loop reads
    only formats whose header gives the decoded size (imaging.SIZED_FORMATS)."""
    embedded = png(np.zeros((1024, 1024), dtype=np.uint8))
    block = b"icp4" + struct.pack(">I", 8 + len(embedded)) + embedded
    icns = b"icns" + struct.pack(">I", 8 + len(block)) + block
    assert len(icns) < bodies.INLINE_BYTES and "ICNS" not in imaging.SIZED_FORMATS
    # The thread refuses the format by name (Pillow would decode the 1024 x 1024 PNG at load).
    assert decoding_threads(client, monkeypatch, icns, status=400) == [False, True]
    assert detail(client.post("/encode", files=files(icns)), 400).endswith(
        "is in the ICNS format, which this server does not decode"
    )


def test_an_upload_that_pillow_would_decode_in_python_for_seconds_is_refused(client: TestClient) -> None:
    """QOI is decoded a byte at a time in Python (14 MB: 10 s of the one image-decoding thread)."""
    noise = np.random.default_rng(0).integers(0, 256, (600, 600, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "QOI")
    qoi = buffer.getvalue()
    assert detail(client.post("/encode", files=files(qoi)), 400) == (
        f"file 0 ('image0.png') is a QOI of {len(qoi)} bytes, which is decoded in Python here; this server "
        f"decodes at most {imaging.MAX_PYTHON_DECODED_BYTES} bytes of it (send a PNG or JPEG)"
    )


def test_json_base64_matches_multipart(client: TestClient) -> None:
    data = digit_png(3)
    multipart = client.post("/encode", files=files(data))
    as_json = client.post("/encode", json={"images": [b64(data)]})
    as_data_url = client.post("/encode", json={"images": ["data:image/png;base64," + b64(data)]})
    upper_case = client.post("/encode", json={"images": ["DATA:image/png;base64," + b64(data)]})
    assert multipart.content == as_json.content == as_data_url.content == upper_case.content


def test_a_data_url_without_its_comma_is_named(client: TestClient) -> None:
    response = client.post("/encode", json={"images": ["data:image/png;base64" + b64(digit_png(3))]})
    assert messages(response) == [
        (
            ("body", "images", 0),
            "Value error, a data: URL with no comma before its data (data:image/png;base64,<base64>)",
        )
    ]


def test_samples_are_the_reparameterised_draws(client: TestClient, card: ModelCard) -> None:
    result = body(
        client.post("/encode?samples=4&seed=11", files=files(digit_png(0), digit_png(5))), EncodeResponse
    )
    assert np.shape(result.z) == (2, 4, card.latent_dim)
    eps = np.random.default_rng(11).standard_normal((2, 4, card.latent_dim))
    expected = np.asarray(result.mu)[:, None] + np.exp(0.5 * np.asarray(result.logvar))[:, None] * eps
    # z is returned as float32.
    np.testing.assert_allclose(result.z, expected, rtol=1e-6, atol=1e-6)


def test_same_seed_gives_byte_identical_responses(client: TestClient) -> None:
    images = files(digit_png(0), digit_png(7))
    first = client.post("/encode?samples=3&seed=42", files=images)
    second = client.post("/encode?samples=3&seed=42", files=images)
    other = client.post("/encode?samples=3&seed=43", files=images)
    assert first.status_code == 200
    assert first.content == second.content
    assert other.content != first.content


def test_without_a_seed_draws_differ(client: TestClient) -> None:
    images = files(digit_png(0))
    assert (
        client.post("/encode?samples=2", files=images).content
        != client.post("/encode?samples=2", files=images).content
    )


def test_invert_reads_dark_on_light_images(client: TestClient) -> None:
    pixels = np.asarray(np.random.default_rng(0).integers(0, 256, size=(8, 8)), dtype=np.uint8)
    plain = body(client.post("/encode", files=files(png(pixels))), EncodeResponse)
    inverted = body(client.post("/encode?invert=true", files=files(png(255 - pixels))), EncodeResponse)
    # 1 - (1 - x) in float32 can differ from x by one ulp.
    np.testing.assert_allclose(inverted.mu, plain.mu, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("content", "content_type", "expected"),
    [
        (b"hello", "text/plain", "content type 'text/plain' is not supported here; send application/json or"),
        (b"hello", None, "content type '(none)' is not supported here"),
        (b"<a/>", "application/xml", "content type 'application/xml' is not supported here"),
    ],
    ids=["text", "none", "xml"],
)
def test_unsupported_content_type_is_415(
    client: TestClient, content: bytes, content_type: str | None, expected: str
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/encode", content=content, headers=headers)
    assert detail(response, 415).startswith(expected)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "file 1 ('image1.png') is empty (0 bytes)"),
        (b"GIF89a but not really", "file 1 ('image1.png') is not an image format Pillow can read"),
        (truncated_png(), "file 1 ('image1.png') cannot be decoded"),
    ],
    ids=["empty", "garbage", "truncated"],
)
def test_unreadable_file_is_400_naming_it(client: TestClient, data: bytes, expected: str) -> None:
    response = client.post("/encode", files=files(digit_png(0), data))
    assert detail(response, 400).startswith(expected)


def test_unreadable_json_image_is_400_naming_it(client: TestClient) -> None:
    response = client.post("/encode", json={"images": [b64(digit_png(0)), b64(b"nope")]})
    assert detail(response, 400) == "images[1] is not an image format Pillow can read"
    response = client.post("/encode", json={"images": [""]})
    assert detail(response, 400) == "images[0] is empty (0 bytes)"


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"images": ["!!!not base64"]}, (("body", "images", 0), "Value error, not valid base64")),
        ({"images": []}, (("body", "images"), "List should have at least 1 item after validation, not 0")),
        ({"images": "abc"}, (("body", "images"), "Input should be a valid array")),
        ({"images": [12]}, (("body", "images", 0), "Input should be a valid bytes")),
        ({}, (("body", "images"), "Field required")),
        ({"images": [b64(b"x")], "other": 1}, (("body", "other"), "Extra inputs are not permitted")),
    ],
    ids=["bad-base64", "empty-list", "string", "number", "missing", "extra-field"],
)
def test_bad_json_is_422(
    client: TestClient, payload: object, expected: tuple[tuple[object, ...], str]
) -> None:
    assert messages(client.post("/encode", json=payload)) == [expected]


def test_malformed_json_is_422(client: TestClient) -> None:
    response = client.post("/encode", content=b'{"images": [', headers={"content-type": "application/json"})
    [(loc, message)] = messages(response)
    assert loc == ("body",)
    assert message.startswith("Invalid JSON")


def test_multipart_without_parts_is_422(client: TestClient) -> None:
    response = client.post(
        "/encode", content=b"--b--\r\n", headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert messages(response) == [
        (("body", "files"), "no images: send one multipart part named 'files' per image")
    ]


def test_multipart_part_of_another_name_is_422(client: TestClient) -> None:
    """An option sent as a form field would otherwise be ignored without a word."""
    response = client.post("/encode", data={"invert": "true"}, files=files(digit_png(0)))
    expected = (
        "part 0 is named 'invert'; this endpoint reads image files in parts named 'files' "
        "(options go in the query string)"
    )
    assert messages(response) == [(("body", "invert"), expected)]


def test_truncated_multipart_is_400(client: TestClient) -> None:
    """A body cut off inside a part loses that part: refused rather than answered without it."""
    part = b'--b\r\nContent-Disposition: form-data; name="files"; filename="0.png"\r\n\r\n' + digit_png(0)
    response = client.post(
        "/encode", content=part, headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert detail(response, 400) == "the multipart/form-data body ends before its closing boundary"


def test_a_multipart_preamble_is_skipped_however_the_body_is_chunked(client: TestClient) -> None:
    """RFC 2046 lets text precede the first boundary (MIME writers add one); the parts after it are read."""
    parts = b"".join(
        b'--b\r\nContent-Disposition: form-data; name="files"; filename="%d.png"\r\n\r\n%s\r\n'
        % (i, digit_png(i))
        for i in range(2)
    )
    plain = client.post("/encode", files=files(digit_png(0), digit_png(1))).json()
    body = b"This is a multi-part message in MIME format.\r\n" + parts + b"--b--\r\n"
    headers = {"content-type": "multipart/form-data; boundary=b"}
    for content in (body, (body[i : i + 7] for i in range(0, len(body), 7))):
        response = client.post("/encode", content=content, headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["mu"] == plain["mu"]
    # A first boundary that does not start a line is no preamble: skipping to the next one dropped an image.
    for start in (b" ", b"preamble\n"):
        response = client.post("/encode", content=start + parts + b"--b--\r\n", headers=headers)
        assert detail(response, 400) == (
            "the body is not valid multipart/form-data: the body's first boundary does not start a line"
        )


def test_multipart_text_in_files_is_422(client: TestClient) -> None:
    response = client.post("/encode", data={"files": "not a file"}, files={"x": ("a", b"", "text/plain")})
    assert messages(response) == [(("body", "files", 0), "files[0] is a text field, not a file")]


def _one_part(disposition: bytes, content: bytes) -> dict[str, Any]:
    part = b"--b\r\nContent-Disposition: form-data; name=files; " + disposition + b"\r\n\r\n" + content
    return {
        "content": part + b"\r\n--b--\r\n",
        "headers": {"content-type": "multipart/form-data; boundary=b"},
    }


def test_part_named_by_extended_filename_only_is_a_file(client: TestClient) -> None:
    """RFC 2231's `filename*` (which python-multipart's header parser drops) still makes a part a file, and
    its decoded name is the one an error quotes."""
    plain = client.post("/encode", files=files(digit_png(3)))
    extended = client.post("/encode", **_one_part(b"filename*=UTF-8''three.png", digit_png(3)))
    assert extended.status_code == 200, extended.text
    assert extended.json() == plain.json()
    response = client.post("/encode", **_one_part(b"filename*=utf-8'en'%E2%82%AC%20notes.txt", b"text"))
    assert detail(response, 400) == "file 0 ('€ notes.txt') is not an image format Pillow can read"
    # The label is always some name: charsets past RFC 5987's two (Python's codecs would raise on some of
    # them) are read as UTF-8, a quoted value is unquoted, and the extended name comes before the plain one.
    for disposition, name in (
        (b"filename*=x-unknown''a%2Etxt", "a.txt"),
        (b"filename*=punycode''%FF.txt", "\ufffd.txt"),
        (b"filename*=undefined''%41.txt", "A.txt"),
        (b"filename*=ISO-8859-1''%E9.txt", "\xe9.txt"),
        (b"filename*=\"UTF-8''q.txt\"", "q.txt"),
        (b"filename*=bare.txt", "bare.txt"),
        (b"filename=plain.txt; filename*=UTF-8''extended.txt", "extended.txt"),
        # Quoted strings are values, not parameters: a plain name holding "; filename*=", or a ";" inside
        # a quoted extended one.
        (b"filename=\"a; filename*=UTF-8''b.txt\"", "a; filename*=UTF-8''b.txt"),
        (b"filename*=\"UTF-8''c;d.txt\"", "c;d.txt"),
    ):
        response = client.post("/encode", **_one_part(disposition, b"text"))
        assert detail(response, 400) == f"file 0 ({name!r}) is not an image format Pillow can read", (
            disposition
        )


def test_too_many_images_is_422(limited: TestClient) -> None:
    limit = LIMITS["max_images"]
    images = [digit_png(i) for i in range(limit + 1)]
    # A multipart body is refused at its first image past the limit, before the rest is read.
    assert messages(limited.post("/encode", files=files(*images))) == [
        (("body", "files"), f"more than {limit} images sent; this server takes at most {limit} per request")
    ]
    assert messages(limited.post("/encode", json={"images": [b64(i) for i in images]})) == [
        (("body", "images"), f"{limit + 1} images sent; this server takes at most {limit} per request")
    ]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("samples=-1", (("query", "samples"), "Input should be greater than or equal to 0")),
        ("samples=3", (("query", "samples"), "samples is 3; this server allows at most 2 (VAE_MAX_SAMPLES)")),
        (
            "samples=two",
            (("query", "samples"), "Input should be a valid integer, unable to parse string as an integer"),
        ),
        ("seed=-5", (("query", "seed"), "Input should be greater than or equal to 0")),
        ("invert=maybe", (("query", "invert"), "Input should be a valid boolean, unable to interpret input")),
    ],
    ids=["negative-samples", "too-many-samples", "word", "negative-seed", "bad-invert"],
)
def test_bad_options_are_422(
    limited: TestClient, query: str, expected: tuple[tuple[object, ...], str]
) -> None:
    assert messages(limited.post(f"/encode?{query}", files=files(digit_png(0)))) == [expected]
