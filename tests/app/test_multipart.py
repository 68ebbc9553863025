"""The fast multipart parser splits what clients send, and agrees with Starlette's parser or defers to it."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
from fastapi.testclient import TestClient
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from starlette.datastructures import UploadFile
from starlette.requests import Request

from app.multipart import Part, boundary_of, parse_form, text_value
from benchmarks.scenarios import digit_png

BOUNDARY = "b0undary-7f3a"
PROPERTIES = settings(max_examples=500, deadline=None, database=None)


FormParts = list[tuple[str, str | None, bytes | str]]  # text fields as str


def fast_parts(body: bytes, boundary: str) -> FormParts | None:
    """parse_form's parts with text fields decoded as the service decodes them."""
    parts = parse_form(body, boundary.encode())
    if parts is None:
        return None
    return [
        (name, filename, content if filename is not None else text_value(content))
        for name, filename, content in parts
    ]


def starlette_parts(body: bytes, content_type: str) -> FormParts | str:
    """What Starlette's own parser makes of a body; its error text when it refuses the body."""

    async def parse() -> FormParts | str:
        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {"type": "http", "method": "POST", "headers": [(b"content-type", content_type.encode())]}
        try:
            form = await Request(scope, receive).form(max_files=1000, max_fields=1000)
        except Exception as error:  # Starlette raises HTTPException (400) for bodies it cannot parse
            return f"refused: {error}"
        parts: FormParts = []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                parts.append((name, value.filename, await value.read()))
            else:
                parts.append((name, None, value))
        return parts

    return asyncio.run(parse())


def body_of(parts: list[Part], boundary: str = BOUNDARY) -> bytes:
    """A multipart body in the layout curl and httpx write."""
    chunks = []
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (
            f'; filename="{filename}"' if filename is not None else ""
        )
        headers = f"Content-Disposition: {disposition}\r\n"
        if filename is not None:
            headers += "Content-Type: application/octet-stream\r\n"
        chunks.append(f"--{boundary}\r\n{headers}\r\n".encode() + content + b"\r\n")
    return b"".join(chunks) + f"--{boundary}--\r\n".encode()


def test_splits_the_bodies_httpx_writes() -> None:
    request = httpx.Request(
        "POST",
        "http://test/encode",
        data={"steps": "5"},
        files=[
            ("files", ("a.png", b"\x89PNG one", "image/png")),
            ("files", ("b.png", b"two\r\n--", "image/png")),
        ],
    )
    body, content_type = request.read(), request.headers["content-type"]
    boundary = boundary_of(content_type)
    assert boundary is not None
    assert parse_form(body, boundary) == [
        ("steps", None, b"5"),
        ("files", "a.png", b"\x89PNG one"),
        ("files", "b.png", b"two\r\n--"),
    ]
    assert fast_parts(body, boundary.decode()) == starlette_parts(body, content_type)


def test_reads_the_boundary_as_starlette_does() -> None:
    assert boundary_of('multipart/form-data; boundary="a b:c"') == b"a b:c"
    assert boundary_of('multipart/form-data; boundary="a\\\\b"') == b"a\\b"  # quoted-string escape
    assert boundary_of("multipart/form-data; boundary=" + "x" * 100) == b"x" * 100
    assert boundary_of("multipart/form-data; charset=UTF-8; boundary=xyz") == b"xyz"
    assert boundary_of("multipart/form-data") is None


def test_defers_other_charsets_to_starlette() -> None:
    """Starlette decodes names and text fields with the declared charset; the fast parser knows only UTF-8."""
    content_type = f"multipart/form-data; charset=latin-1; boundary={BOUNDARY}"
    body = body_of([("steps", None, "é".encode())])
    assert boundary_of(content_type) is None
    assert starlette_parts(body, content_type) == [("steps", None, "Ã©")]


def test_an_empty_file_name_is_still_a_file() -> None:
    body = body_of([("file", "", b"data")])
    assert parse_form(body, BOUNDARY.encode()) == [("file", "", b"data")]


def test_defers_unusual_layouts_to_starlette() -> None:
    plain = body_of([("file", "a.png", b"data")])
    unusual = [
        b"preamble\r\n" + plain,  # text before the first boundary
        plain.replace(b"--\r\n", b"--\r\nepilogue"),  # text after the last one
        plain.replace(b"Content-Type:", b"Content-Transfer-Encoding: base64\r\nContent-Type:"),
        plain.replace(b'filename="a.png"', b"filename*=UTF-8''a.png"),
        plain.replace(b'name="file"', b'name="fi\\"le"'),  # an escaped quote
        plain.replace(b'name="file"', b'name="_charset_"'),
        plain.replace(b"form-data;", b"attachment;"),
        plain[: plain.rindex(b"--\r\n")],  # no closing delimiter
        plain.replace(f"--{BOUNDARY}\r\nContent".encode(), f"--{BOUNDARY}  \r\nContent".encode()),
        plain.replace(b'name="file"', b'name="file"\x0b'),  # python-multipart strips only space and tab
        plain.replace(b"a.png", b"a" * 2000 + b".png"),  # a header line longer than clients write
        plain.replace(b"Content-Type:", b"Content-Type: image/png\r\nContent-Type:"),  # a third header line
    ]
    for body in unusual:
        assert parse_form(body, BOUNDARY.encode()) is None, body


field_names = st.text(st.characters(codec="utf-8", exclude_characters='"\\\r\n'), min_size=1, max_size=12)
file_names = st.none() | st.text(st.characters(codec="utf-8", exclude_characters='"\\\r\n'), max_size=12)


@PROPERTIES
@given(
    parts=st.lists(st.tuples(field_names, file_names, st.binary(max_size=64)), min_size=1, max_size=5),
    boundary=st.text(st.sampled_from("abcXYZ0123456789-_'()+,./:=?"), min_size=1, max_size=40),
)
def test_plain_bodies_parse_as_starlette_parses_them(
    parts: list[tuple[str, str | None, bytes]], boundary: str
) -> None:
    assume(boundary.strip() == boundary and not boundary.endswith("-"))
    assume(all(name != "_charset_" for name, _, _ in parts))  # deferred to Starlette on purpose
    body = body_of(parts, boundary)
    assume(body.count(f"--{boundary}".encode()) == len(parts) + 1)  # no content contains the delimiter
    expected = starlette_parts(body, f"multipart/form-data; boundary={boundary}")
    text_parts_are_utf8 = all(filename is not None or _is_utf8(content) for _, filename, content in parts)
    assume(text_parts_are_utf8 and not isinstance(expected, str))
    assert fast_parts(body, boundary) == expected


@PROPERTIES
@given(body=st.binary(max_size=300), cut=st.integers(0, 400), junk=st.binary(max_size=8))
def test_any_body_parses_as_starlette_parses_it_or_is_deferred(body: bytes, cut: int, junk: bytes) -> None:
    """Damaged bodies: the fast parser may defer (None), but never disagrees with Starlette."""
    plain = body_of([("file", "a.png", body), ("steps", None, b"5")])
    damaged = plain[:cut] + junk + plain[cut:]
    parsed = fast_parts(damaged, BOUNDARY)
    if parsed is not None:
        assert parsed == starlette_parts(damaged, f"multipart/form-data; boundary={BOUNDARY}")


def _is_utf8(content: bytes) -> bool:
    try:
        content.decode()
    except UnicodeDecodeError:
        return False
    return True


def test_encode_answers_alike_on_both_parsers(client: TestClient) -> None:
    """A body the fast parser defers (an extra part header) gets the same answer from Starlette's."""
    plain = body_of([("file", "digit.png", digit_png())])
    unusual = plain.replace(b"Content-Type:", b"X-Note: scanned\r\nContent-Type:")
    assert parse_form(unusual, BOUNDARY.encode()) is None
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    fast = client.post("/encode", content=plain, headers=headers)
    general = client.post("/encode", content=unusual, headers=headers)
    assert fast.status_code == general.status_code == 200
    assert fast.json() == general.json()
    assert np.array(fast.json()["items"][0]["mean"]).shape == (16,)
