"""The attachment store: content-addressed, bounded, served to API clients."""

from __future__ import annotations

import hashlib

import pytest

from gateway.attachments import AttachmentStore, AttachmentTooLarge


async def test_same_bytes_are_stored_once_and_named_safely(tmp_path):
    store = AttachmentStore(tmp_path, max_size=1024)
    a = await store.put(b"photo", "../../etc/passwd", "image/jpeg")
    b = await store.put(b"photo", "second.jpg", "")
    assert a.sha256 == b.sha256 == hashlib.sha256(b"photo").hexdigest()
    assert a.ref == f"/v1/attachments/{a.sha256}"
    assert "/" not in a.name and a.name.endswith("passwd")
    assert b.content_type == "application/octet-stream"
    # the bytes once, and the type they first came with beside them
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert files == [a.sha256, a.sha256 + ".type"]
    assert store.content_type(store.path_for(a.sha256)) == "image/jpeg"
    c = await store.put(b"no type", "c", "not a type<script>")
    assert c.content_type == "not a type<script>"  # the record keeps what was said...
    served = store.content_type(store.path_for(c.sha256))
    assert served == "application/octet-stream"  # ...but it is served as bytes
    with pytest.raises(AttachmentTooLarge):
        await store.put(b"x" * 1025, "big", "application/octet-stream")
    with pytest.raises(ValueError):
        store.path_for("../secret")


async def test_attachments_are_served_over_http_with_a_key(
    start_gateway, aiohttp_client_session, monkeypatch
):
    monkeypatch.setenv("READER_KEY", "reader-key-123456")
    gw = await start_gateway(
        api={
            "open_to_loopback": False,
            "keys": [{"name": "cases", "key_env": "READER_KEY", "scopes": ["read"]}],
        }
    )
    attachment = await gw.attachments.put(b"%PDF-1.7 letter", "letter.pdf", "application/pdf")
    url = f"http://127.0.0.1:{gw.http_port}{attachment.ref}"
    async with aiohttp_client_session.get(url) as resp:
        assert resp.status == 401
    headers = {"Authorization": "Bearer reader-key-123456"}
    async with aiohttp_client_session.get(url, headers=headers) as resp:
        assert resp.status == 200 and await resp.read() == b"%PDF-1.7 letter"
        # served with the type it was stored with (was application/octet-stream for all)
        assert resp.headers["Content-Type"] == "application/pdf"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    async with aiohttp_client_session.get(url[:-4] + "0000", headers=headers) as resp:
        assert resp.status == 404
    async with aiohttp_client_session.get(url + "x", headers=headers) as resp:
        assert resp.status == 400
        assert resp.headers["Content-Type"] == "application/problem+json"
