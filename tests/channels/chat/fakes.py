"""Local servers speaking the providers' real wire formats: the Telegram Bot API, WeChat's and
Weibo's customer-service APIs. Each runs on an ephemeral loopback port and records what it got.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

BOT_TOKEN = "123456:TEST-token_abcdefghijklmnopqrstuv"
BOT_ID = 123456
BOT_USERNAME = "hotline12345_bot"


class LocalServer:
    """An aiohttp app on 127.0.0.1:0."""

    handler_cancellation = False
    """Whether a request's handler is cancelled when its client closes the connection."""

    def __init__(self) -> None:
        self.app = web.Application()
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.runner = web.AppRunner(self.app, handler_cancellation=self.handler_cancellation)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def _ok(result: Any) -> web.Response:
    # the stdlib's encoder: it writes any string, a lone surrogate as its \ud8xx escape
    return web.Response(
        body=json.dumps({"ok": True, "result": result}).encode(), content_type="application/json"
    )


def user(
    uid: int = 777000001, first: str = "Li", last: str | None = "Wei", *, is_bot: bool = False
) -> dict[str, Any]:
    u: dict[str, Any] = {
        "id": uid,
        "is_bot": is_bot,
        "first_name": first,
        "language_code": "zh-hans",
    }
    if last:
        u["last_name"] = last
    return u


def private_chat(uid: int = 777000001) -> dict[str, Any]:
    return {"id": uid, "type": "private", "first_name": "Li"}


def group_chat(cid: int = -1001234567890) -> dict[str, Any]:
    return {"id": cid, "type": "supergroup", "title": "Neighbourhood"}


def message(
    message_id: int, chat: dict[str, Any] | None = None, *, date: int = 1795594480, **content: Any
) -> dict[str, Any]:
    """A Message object as the Bot API documents it (``from``, ``chat`` with ``type``, ``date``)."""
    m: dict[str, Any] = {
        "message_id": message_id,
        "from": user(),
        "chat": chat or private_chat(),
        "date": date,
    }
    m.update(content)
    return m


class FakeBotApi(LocalServer):
    """The Bot API subset the adapter uses: ``/bot<token>/<method>``, ``/file/bot<token>/``."""

    handler_cancellation = True
    """A long poll whose client has gone (a poller cancelled when its lease was lost) ends
    with its connection: counted in flight until its timeout, the successor's poll was
    counted as a second at once and answered the dead one a 409."""

    def __init__(self) -> None:
        super().__init__()
        self.updates: list[dict[str, Any]] = []
        self.offsets: list[int | None] = []
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.sent: list[dict[str, Any]] = []
        self.send_errors: list[dict[str, Any] | None] = []
        self.files: dict[str, tuple[str, bytes]] = {}
        self.on_get_updates: Callable[[int | None], Awaitable[None]] | None = None
        self.webhook_url = ""
        """What setWebhook registered ("" after deleteWebhook), as getWebhookInfo says."""
        self.polling = 0
        """getUpdates requests in flight now; ``most_polling`` the most ever at once."""
        self.most_polling = 0
        self.conflicts = 0
        self._poll_generation = 0
        self._new = asyncio.Event()
        self._closing = False
        self.app.on_shutdown.append(self._end_polls)
        self.app.router.add_route("*", "/bot{token}/{method}", self.method)
        self.app.router.add_get("/file/bot{token}/{path:.+}", self.download)

    async def _end_polls(self, app: web.Application) -> None:
        """Shutting down: a long poll in flight answers now (an empty batch), as Telegram's
        own restarts do, instead of holding the server's clean-up for its whole timeout."""
        self._closing = True
        self._new.set()

    @property
    def api_base(self) -> str:
        return f"{self.base}/bot"

    @property
    def file_base(self) -> str:
        return f"{self.base}/file/bot"

    def push(self, update: dict[str, Any]) -> None:
        self.updates.append(update)
        self._new.set()

    def add_file(self, file_id: str, path: str, data: bytes) -> None:
        self.files[file_id] = (path, data)

    async def method(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != BOT_TOKEN:
            return web.Response(
                status=401,
                body=orjson.dumps({"ok": False, "error_code": 401, "description": "Unauthorized"}),
                content_type="application/json",
            )
        name = request.match_info["method"]
        params: dict[str, Any] = {}
        if request.content_type == "application/json":
            params = await request.json()
        else:
            for key, value in (await request.post()).items():
                if not isinstance(value, str):  # an uploaded file
                    params[key] = (value.filename, value.file.read())
                    continue
                try:
                    params[key] = orjson.loads(value)
                except orjson.JSONDecodeError:
                    params[key] = value
        self.calls.append((name, params))
        handler = getattr(self, f"m_{name}", None)
        if handler is None:
            return web.Response(
                status=404,
                body=orjson.dumps({"ok": False, "error_code": 404, "description": "Not Found"}),
                content_type="application/json",
            )
        result: web.Response = await handler(params)
        return result

    async def m_getMe(self, params: dict[str, Any]) -> web.Response:
        return _ok(
            {
                "id": BOT_ID,
                "is_bot": True,
                "first_name": "Hotline",
                "username": BOT_USERNAME,
                "can_join_groups": True,
                "can_read_all_group_messages": False,
                "supports_inline_queries": False,
            }
        )

    async def m_deleteWebhook(self, params: dict[str, Any]) -> web.Response:
        self.webhook_url = ""
        if params.get("drop_pending_updates") in (True, "true", "True"):
            self.updates.clear()
        return _ok(True)

    async def m_setWebhook(self, params: dict[str, Any]) -> web.Response:
        self.webhook_url = str(params.get("url", ""))
        if params.get("drop_pending_updates") in (True, "true", "True"):
            self.updates.clear()  # Telegram drops every update not yet delivered
        return _ok(True)

    async def m_getWebhookInfo(self, params: dict[str, Any]) -> web.Response:
        return _ok(
            {
                "url": self.webhook_url,
                "has_custom_certificate": False,
                "pending_update_count": len(self.updates),
            }
        )

    async def m_getUpdates(self, params: dict[str, Any]) -> web.Response:
        offset = params.get("offset")
        offset = int(offset) if offset is not None else None
        self.offsets.append(offset)
        if self.on_get_updates is not None:
            await self.on_get_updates(offset)
        timeout = float(params.get("timeout") or 0)
        deadline = time.monotonic() + min(timeout, 1.0)
        # Telegram serves one poller per bot: a new getUpdates ends the one in flight with 409
        self._poll_generation += 1
        generation = self._poll_generation
        self.polling += 1
        self.most_polling = max(self.most_polling, self.polling)
        self._new.set()
        try:
            while True:
                if generation != self._poll_generation:
                    self.conflicts += 1
                    return web.Response(
                        status=409,
                        body=orjson.dumps(
                            {
                                "ok": False,
                                "error_code": 409,
                                "description": "Conflict: terminated by other getUpdates "
                                "request; make sure that only one bot instance is running",
                            }
                        ),
                        content_type="application/json",
                    )
                pending = [u for u in self.updates if offset is None or u["update_id"] >= offset]
                if pending or self._closing or time.monotonic() >= deadline:
                    return _ok(pending[: int(params.get("limit") or 100)])
                self._new.clear()
                try:
                    await asyncio.wait_for(
                        self._new.wait(), max(deadline - time.monotonic(), 0.01)
                    )
                except TimeoutError:
                    pass
        finally:
            self.polling -= 1

    async def m_getFile(self, params: dict[str, Any]) -> web.Response:
        file_id = str(params.get("file_id"))
        if file_id not in self.files:
            return web.Response(
                status=400,
                body=orjson.dumps(
                    {"ok": False, "error_code": 400, "description": "Bad Request: invalid file_id"}
                ),
                content_type="application/json",
            )
        path, data = self.files[file_id]
        return _ok(
            {
                "file_id": file_id,
                "file_unique_id": "u" + file_id,
                "file_size": len(data),
                "file_path": path,
            }
        )

    async def _send(self, method: str, params: dict[str, Any]) -> web.Response:
        if self.send_errors:
            error = self.send_errors.pop(0)
            if error is not None:
                return web.Response(
                    status=error["error_code"],
                    body=orjson.dumps({"ok": False, **error}),
                    content_type="application/json",
                )
        self.sent.append({"method": method, **params})
        chat_id = int(params["chat_id"])
        return _ok(
            {
                "message_id": 9000 + len(self.sent),
                "from": user(BOT_ID, "Hotline", None, is_bot=True),
                "chat": {"id": chat_id, "type": "private"},
                "date": 1795594500,
                "text": params.get("text", ""),
            }
        )

    async def m_sendMessage(self, params: dict[str, Any]) -> web.Response:
        return await self._send("sendMessage", params)

    async def m_sendPhoto(self, params: dict[str, Any]) -> web.Response:
        return await self._send("sendPhoto", params)

    async def m_sendDocument(self, params: dict[str, Any]) -> web.Response:
        return await self._send("sendDocument", params)

    async def download(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != BOT_TOKEN:
            return web.Response(status=401)
        for path, data in self.files.values():
            if path == request.match_info["path"]:
                return web.Response(body=data, content_type="application/octet-stream")
        return web.Response(status=404)


class FakeWeChatApi(LocalServer):
    """``/cgi-bin/token`` and ``/cgi-bin/message/custom/send`` as WeChat answers them."""

    def __init__(self, app_id: str, app_secret: str) -> None:
        super().__init__()
        self.app_id = app_id
        self.app_secret = app_secret
        self.tokens_issued = 0
        self.valid: set[str] = set()
        self.sent: list[dict[str, Any]] = []
        self.errors: list[int | None] = []
        self.uploads: dict[str, tuple[str, str, bytes]] = {}
        self.app.router.add_get("/cgi-bin/token", self.token)
        self.app.router.add_post("/cgi-bin/stable_token", self.stable_token)
        self.app.router.add_post("/cgi-bin/media/upload", self.media_upload)
        self.token_calls: list[str] = []
        self.app.router.add_post("/cgi-bin/message/custom/send", self.custom_send)
        self.media: dict[str, tuple[str, bytes]] = {}
        self.app.router.add_get("/cgi-bin/media/get", self.media_get)

    async def stable_token(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.token_calls.append("stable" + (" force" if body.get("force_refresh") else ""))
        if (body.get("grant_type"), body.get("appid"), body.get("secret")) != (
            "client_credential",
            self.app_id,
            self.app_secret,
        ):
            return web.json_response({"errcode": 40125, "errmsg": "invalid appsecret"})
        if self.valid and not body.get("force_refresh"):
            return web.json_response({"access_token": next(iter(self.valid)), "expires_in": 7000})
        return self._issue()

    def _issue(self) -> web.Response:
        self.tokens_issued += 1
        token = f"ACCESS_TOKEN_{self.tokens_issued}"
        self.valid = {token}
        return web.json_response({"access_token": token, "expires_in": 7200})

    async def token(self, request: web.Request) -> web.Response:
        self.token_calls.append("classic")
        q = request.query
        if (
            q.get("grant_type") != "client_credential"
            or q.get("appid") != self.app_id
            or q.get("secret") != self.app_secret
        ):
            return web.json_response({"errcode": 40125, "errmsg": "invalid appsecret"})
        return self._issue()

    async def media_upload(self, request: web.Request) -> web.Response:
        if request.query.get("access_token") not in self.valid:
            return web.json_response({"errcode": 40001, "errmsg": "invalid credential"})
        if request.query.get("type") != "image":
            return web.json_response({"errcode": 40004, "errmsg": "invalid media type"})
        form = await request.post()
        media = form.get("media")
        if media is None or isinstance(media, str):
            return web.json_response({"errcode": 41005, "errmsg": "media data missing"})
        media_id = f"MEDIA_{len(self.uploads) + 1}"
        self.uploads[media_id] = (media.filename, media.content_type, media.file.read())
        return web.json_response({"type": "image", "media_id": media_id, "created_at": 1795594483})

    async def media_get(self, request: web.Request) -> web.Response:
        if request.query.get("access_token") not in self.valid:
            return web.json_response({"errcode": 40001, "errmsg": "invalid credential"})
        found = self.media.get(request.query.get("media_id", ""))
        if found is None:
            return web.json_response({"errcode": 40007, "errmsg": "invalid media_id"})
        ctype, data = found
        return web.Response(
            body=data,
            content_type=ctype,
            headers={"Content-disposition": 'attachment; filename="MEDIA_ID.jpg"'},
        )

    def expire_tokens(self) -> None:
        self.valid = set()

    async def custom_send(self, request: web.Request) -> web.Response:
        if request.query.get("access_token") not in self.valid:
            return web.json_response(
                {
                    "errcode": 40001,
                    "errmsg": "invalid credential, access_token is invalid or not latest",
                }
            )
        if self.errors:
            code = self.errors.pop(0)
            if code is not None:
                return web.json_response({"errcode": code, "errmsg": "error"})
        raw = await request.read()
        self.sent.append(orjson.loads(raw))
        return web.json_response({"errcode": 0, "errmsg": "ok"})


class FakeWeiboApi(LocalServer):
    """``/2/messages/reply.json`` of the fan service."""

    def __init__(self, access_token: str) -> None:
        super().__init__()
        self.access_token = access_token
        self.sent: list[dict[str, str]] = []
        self.errors: list[tuple[int, int]] = []
        self.app.router.add_post("/2/messages/reply.json", self.reply)

    async def reply(self, request: web.Request) -> web.Response:
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        if form.get("access_token") != self.access_token:
            return web.json_response(
                {
                    "error": "expired_token",
                    "error_code": 21327,
                    "request": "/2/messages/reply.json",
                },
                status=401,
            )
        if self.errors:
            status, code = self.errors.pop(0)
            return web.json_response(
                {"error": "err", "error_code": code, "request": "/2/messages/reply.json"},
                status=status,
            )
        self.sent.append(form)
        return web.json_response(
            {"id": 3500000000000 + len(self.sent), "created_at": "Mon Jul 16 18:09:20 +0800 2012"}
        )
