"""A fast parser for the plain multipart/form-data bodies that HTTP clients send.

Starlette's general parser (python-multipart, a spooled temporary file per upload) costs about 60 us for
one small image, more than decoding it. Bodies in the layout that curl, httpx, requests and browsers write
(no preamble, parts with only Content-Disposition and Content-Type headers, plain quoted parameters) are
split here in a few microseconds. For anything else `parse_form` returns None and the caller uses
Starlette's parser, so unusual bodies get the same answer as before, only slower.
"""

from __future__ import annotations

import codecs
import re

from python_multipart.multipart import parse_options_header

# One part: its field name, its filename for a file upload ("" is still a file, as in Starlette), its bytes.
Part = tuple[str, str | None, bytes]

_DISPOSITION = re.compile(rb'form-data((?:; ?[A-Za-z]+="[^"\\\r\n]*")+)', re.IGNORECASE)
_PARAMETER = re.compile(rb'; ?([A-Za-z]+)="([^"\\\r\n]*)"')
# Starlette's limit for a text field; larger ones take its path (and get its error).
MAX_TEXT_FIELD_BYTES = 1024 * 1024
# Part headers as clients write them are short: longer ones, or more of them, are left to python-multipart,
# which has its own limits on both.
MAX_HEADER_LINE_BYTES = 1024
_CHARSET_FIELD = "_charset_"  # a form's own charset declaration (RFC 7578): left to the general parser


def boundary_of(content_type: str) -> bytes | None:
    """The boundary of a multipart Content-Type, read as Starlette reads it; None without one, or when the
    header names a charset other than UTF-8 (Starlette decodes field names and text with it)."""
    _, parameters = parse_options_header(content_type)
    charset = parameters.get(b"charset")
    if charset is not None:
        try:
            if codecs.lookup(charset.decode("latin-1")).name != "utf-8":
                return None
        except LookupError:
            return None
    return parameters.get(b"boundary") or None


def _part_header(block: bytes) -> tuple[str, str | None] | None:
    """(name, filename or None) from a part's header lines; None unless they are the plain layout."""
    lines = block.split(b"\r\n")
    if len(lines) > 2 or any(b"\r" in line or b"\n" in line for line in lines):
        return None  # more than Content-Disposition and Content-Type, or a bare CR or LF
    name = filename = None
    for line in lines:
        header, colon, value = line.partition(b":")
        if not colon or len(line) > MAX_HEADER_LINE_BYTES:
            return None
        header = header.lower()
        if header == b"content-type":
            continue
        if header != b"content-disposition" or name is not None:
            return None
        disposition = _DISPOSITION.fullmatch(value.strip(b" \t"))
        if disposition is None:
            return None
        parameters: dict[bytes, bytes] = {}
        for key, quoted in _PARAMETER.findall(disposition.group(1)):
            key = key.lower()
            if key in parameters or key not in (b"name", b"filename"):
                return None
            parameters[key] = quoted
        if b"name" not in parameters:
            return None
        try:
            name = parameters[b"name"].decode()
            filename = parameters[b"filename"].decode() if b"filename" in parameters else None
        except UnicodeDecodeError:
            return None
    if name is None or name == _CHARSET_FIELD:
        return None
    return name, filename


def text_value(content: bytes) -> str:
    """A text field's value, decoded as Starlette decodes it: UTF-8, else Latin-1."""
    try:
        return content.decode()
    except UnicodeDecodeError:
        return content.decode("latin-1")


def parse_form(body: bytes, boundary: bytes) -> list[Part] | None:
    """The parts of a plain multipart body, in order; None when the body needs the general parser."""
    delimiter = b"--" + boundary
    separator = b"\r\n" + delimiter
    if not body.startswith(delimiter + b"\r\n"):
        return None
    parts: list[Part] = []
    position = len(delimiter) + 2
    while True:
        headers_end = body.find(b"\r\n\r\n", position)
        if headers_end <= position:
            return None
        header = _part_header(body[position:headers_end])
        if header is None:
            return None
        content_start = headers_end + 4
        content_end = body.find(separator, content_start)
        if content_end < 0:
            return None
        content = body[content_start:content_end]
        if header[1] is None and len(content) > MAX_TEXT_FIELD_BYTES:
            return None
        parts.append((header[0], header[1], content))
        position = content_end + len(separator)
        if body.startswith(b"\r\n", position):
            position += 2
            continue
        if body.startswith(b"--", position) and body[position + 2 :] in (b"", b"\r\n"):
            return parts
        return None
