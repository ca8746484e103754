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
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [a.sha256]
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
    async with aiohttp_client_session.get(url[:-4] + "0000", headers=headers) as resp:
        assert resp.status == 404
    async with aiohttp_client_session.get(url + "x", headers=headers) as resp:
        assert resp.status == 400
