"""The fast read path answers only the plain case; everything else goes on to Quart."""

from __future__ import annotations

from typing import Any

import pytest
from lightd.api.auth import VENDOR_MEDIA_TYPE
from lightd.api.fastpath import answer, json_body
from lightd.config import AuthorizationConfig

TOKEN = "lightd_" + "f" * 32
AUTH = AuthorizationConfig(token=TOKEN)
READERS = {
    "/containers/": lambda key: json_body({"id": key, "é": 1}) if key == "known" else None,
    "/containers": lambda rest: json_body({"all": rest}),
}
PLAIN = [(b"accept", VENDOR_MEDIA_TYPE.encode()), (b"authorization", f"Bearer {TOKEN}".encode())]


def scope(path: str = "/containers/known", headers: list[tuple[bytes, bytes]] = PLAIN) -> Any:
    return {"type": "http", "method": "GET", "path": path, "query_string": b"", "headers": headers}


def test_the_plain_case_is_answered_as_quart_writes_json() -> None:
    assert answer(AUTH, READERS, scope()) == b'{"id":"known","\\u00e9":1}\n'
    assert answer(AUTH, READERS, scope("/containers")) == b'{"all":""}\n'
    accept = (b"accept", b"text/html, Application/VND.pkglatv1+json; q=0.9")
    assert answer(AUTH, READERS, scope(headers=[accept, PLAIN[1]])) is not None


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/containers/unknown", PLAIN),  # Quart says 404 in the contract's words
        ("/containers/", PLAIN),
        ("/containers/known/install-log", PLAIN),
        ("/containers/known/", PLAIN),
        ("/containersknown", PLAIN),
        ("/containers//known", PLAIN),
        ("/volumes/known", PLAIN),
        ("/containers/known", PLAIN[:1]),  # no token: 401
        ("/containers/known", PLAIN[1:]),  # no vendor header: 403
        ("/containers/known", [PLAIN[0], (b"authorization", b"Bearer lightd_" + b"x" * 32)]),
        ("/containers/known", [PLAIN[0], (b"authorization", f"Basic {TOKEN}".encode())]),
        ("/containers/known", [(b"accept", b"application/json"), PLAIN[1]]),
        ("/containers/known", [*PLAIN, (b"origin", b"https://panel.example")]),  # CORS
        ("/containers/known", [*PLAIN, (b"accept", b"text/html")]),  # repeated header
    ],
)
def test_anything_else_goes_on_to_quart(path: str, headers: list[tuple[bytes, bytes]]) -> None:
    assert answer(AUTH, READERS, scope(path, headers)) is None


def test_disabled_authorization_goes_on_to_quart() -> None:
    """Quart logs every request served without a token; the fast path must not hide them."""
    disabled = AuthorizationConfig(enabled=False, token=TOKEN)
    assert answer(disabled, READERS, scope()) is None
