"""WeChat and Weibo pushes built the way the platforms document them, independently of our code.

Signatures: sha1 over the lexicographically sorted strings, concatenated (WeChat "接入指南" and
Weibo fan service "URL 验证"). Safe mode: AES-256-CBC, key = base64(EncodingAESKey + "="),
IV = first 16 key bytes, plaintext = 16 random bytes + 4-byte big-endian length + message +
AppID, PKCS#7 padded to 32 bytes (WeChat "消息加解密说明").
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import struct
from typing import Any
from urllib.parse import urlencode

import orjson
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

TOKEN = "spamtest"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
APP_ID = "wx2c2769f8efd9abc2"
ACCOUNT = "gh_10f6c3c3ac5a"
OPENID = "oyORnuP8q7ou2gfYjqLzSIWZf0rs"

# Tencent's own sample (WXBizMsgCrypt demo): this ciphertext, under the key, token, AppID,
# timestamp and nonce above, has exactly this msg_signature.
SAMPLE_TIMESTAMP = "1409735669"
SAMPLE_NONCE = "1320562132"
SAMPLE_MSG_SIGNATURE = "5d197aaffba7e9b25a30732f161a50dee96bd5fa"
SAMPLE_ENCRYPT = (
    "hyzAe4OzmOMbd6TvGdIOO6uBmdJoD0Fk53REIHvxYtJlE2B655HuD0m8KUePWB3+LrPXo87wzQ1QLvbeUgmBM4x6F8P"
    "GHQHFVAFmOD2LdJF9FrXpbUAh0B5GIItb52sn896wVsMSHGuPE328HnRGBcrS7C41IzDWyWNlZkyyXwon8T332jisa+h"
    "6tEDYsVticbSnyU8dKOIbgU6ux5VTjg3yt+WGzjlpKn6NPhRjpA912xMezR4kw6KWwMrCVKSVCZciVGCgavjIQ6X8tCO"
    "p3yZbGpy0VxpAe+77TszTfRd5RJSVO/HTnifJpXgCSUdUue1v6h0EIBYYI1BD1DlD+C0CR8e6OewpusjZ4uBl9FyJvnh"
    "vQl+q5rv1ixrcpCumEPo5MJSgM9ehVsNPfUM669WuMyVWQLCzpu9GhglF2PE="
)


def sign(*parts: str) -> str:
    return hashlib.sha1("".join(sorted(parts)).encode()).hexdigest()


def wechat_xml(
    kind: str, fields: dict[str, str | int], *, create_time: int, msg_id: int | None
) -> bytes:
    """A push as WeChat documents it ("接收普通消息" / "接收事件推送")."""
    parts = [
        f"<ToUserName><![CDATA[{ACCOUNT}]]></ToUserName>",
        f"<FromUserName><![CDATA[{OPENID}]]></FromUserName>",
        f"<CreateTime>{create_time}</CreateTime>",
        f"<MsgType><![CDATA[{kind}]]></MsgType>",
    ]
    for key, value in fields.items():
        parts.append(
            f"<{key}>{value}</{key}>"
            if isinstance(value, int)
            else f"<{key}><![CDATA[{value}]]></{key}>"
        )
    if msg_id is not None:
        parts.append(f"<MsgId>{msg_id}</MsgId>")
    return ("<xml>" + "".join(parts) + "</xml>").encode()


def text(content: str, *, create_time: int, msg_id: int) -> bytes:
    return wechat_xml("text", {"Content": content}, create_time=create_time, msg_id=msg_id)


def event(name: str, *, create_time: int, key: str = "") -> bytes:
    fields: dict[str, str | int] = {"Event": name}
    if key:
        fields["EventKey"] = key
    return wechat_xml("event", fields, create_time=create_time, msg_id=None)


def _nonce() -> str:
    """A fresh nonce, as the platforms send with every push (a signed query is single-use)."""
    return str(random.randrange(10**9, 10**10))


def wechat_query(
    timestamp: int, nonce: str | None = None, token: str = TOKEN, **extra: str
) -> str:
    nonce = nonce or _nonce()
    q = {
        "signature": sign(token, str(timestamp), nonce),
        "timestamp": str(timestamp),
        "nonce": nonce,
    }
    q.update(extra)
    return urlencode(q)


def aes_encrypt(message: bytes, key: str = AES_KEY, app_id: str = APP_ID) -> str:
    raw_key = base64.b64decode(key + "=")
    body = os.urandom(16) + struct.pack(">I", len(message)) + message + app_id.encode()
    pad = 32 - len(body) % 32
    body += bytes([pad]) * pad
    enc = Cipher(algorithms.AES(raw_key), modes.CBC(raw_key[:16])).encryptor()
    return base64.b64encode(enc.update(body) + enc.finalize()).decode()


def aes_decrypt(encrypted: str, key: str = AES_KEY) -> tuple[bytes, bytes]:
    raw_key = base64.b64decode(key + "=")
    dec = Cipher(algorithms.AES(raw_key), modes.CBC(raw_key[:16])).decryptor()
    plain = dec.update(base64.b64decode(encrypted)) + dec.finalize()
    plain = plain[: -plain[-1]]
    (length,) = struct.unpack(">I", plain[16:20])
    return plain[20 : 20 + length], plain[20 + length :]


def safe_push(
    message: bytes, timestamp: int, nonce: str = "1320562132", app_id: str = APP_ID
) -> tuple[str, bytes]:
    """Query string and body of a safe-mode push: Encrypt in the body, msg_signature in the URL."""
    encrypted = aes_encrypt(message, app_id=app_id)
    body = (
        f"<xml><ToUserName><![CDATA[{ACCOUNT}]]></ToUserName>"
        f"<Encrypt><![CDATA[{encrypted}]]></Encrypt></xml>"
    )
    query = wechat_query(
        timestamp,
        nonce,
        openid=OPENID,
        encrypt_type="aes",
        msg_signature=sign(TOKEN, str(timestamp), nonce, encrypted),
    )
    return query, body.encode()


# ---------------------------------------------------------------- Weibo

APP_SECRET = "weibo-app-secret-0123456789"
WEIBO_ACCOUNT = 1902538057
WEIBO_USER = 2489518277


def weibo_push(
    kind: str,
    text: str = "",
    data: dict[str, Any] | None = None,
    created_at: str = "Mon Jul 16 18:09:20 +0800 2012",
) -> bytes:
    """A fan service push in JSON, as the open platform documents it."""
    return orjson.dumps(
        {
            "type": kind,
            "receiver_id": WEIBO_ACCOUNT,
            "sender_id": WEIBO_USER,
            "created_at": created_at,
            "text": text,
            "data": data or {},
        }
    )


def weibo_query(
    timestamp: int, nonce: str | None = None, secret: str = APP_SECRET, **extra: str
) -> str:
    nonce = nonce or _nonce()
    q = {
        "signature": sign(secret, str(timestamp), nonce),
        "timestamp": str(timestamp),
        "nonce": nonce,
    }
    q.update(extra)
    return urlencode(q)
