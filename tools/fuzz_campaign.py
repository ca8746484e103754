"""Fuzz campaign: many mutated inputs into every parser that reads bytes from outside.

In-process targets call the real parsers (the same functions the listeners call) with inputs
mutated from real-looking seeds; socket targets send mutated requests to a running gateway's
HTTP webhooks, SMTP and FastAGI listeners. Per target it reports inputs, unexpected exceptions
("crashes": anything but the parser's own error type), 500 answers, hangs (an input or request
over ``--hang`` seconds) and the process RSS at start and end.

    .venv/bin/python tools/fuzz_campaign.py --seconds 30 --max-inputs 1000000
    .venv/bin/python tools/fuzz_campaign.py --socket-seconds 60 --only socket
    .venv/bin/python tools/fuzz_campaign.py --smoke     # what `make test` runs: a few seconds
    nice -n 19 .venv/bin/python tools/fuzz_campaign.py --only inprocess --isolate \\
        --seconds 7200 --checkpoint var/fuzz-checkpoint.json   # the 1,000,000-input campaign

Figures are in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# ------------------------------------------------------------------ mutation

INTERESTING = [
    b"\x00", b"\xff", b"\xed\xa0\x80", b"\xc3", b"\r\n", b"\n\n", b"%", b"%00", b"%ZZ", b"&",
    b"=", b"\"", b"'", b"<", b">", b"]]>", b"<![CDATA[", b"{", b"}", b"[", b"]", b"\\u0000",
    b"\\ud800", b"-1", b"1e999", b"99999999999999999999999", b"null", b"true", b"\t", b" ",
    b"<!DOCTYPE x [<!ENTITY a \"b\">]>", b"&a;", b"=?utf-8?b?5L2g5aW9?=", b"\x1b", b"\xe2\x80\xae",
]


def mutate(seed: bytes, rng: random.Random) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.choice((1, 1, 2, 3, 5, 8))):
        op = rng.randrange(9)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:  # flip bits
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # insert random bytes
            data[pos:pos] = rng.randbytes(rng.randrange(1, 16))
        elif op == 2 and data:  # delete a run
            del data[pos : pos + rng.randrange(1, 32)]
        elif op == 3:  # insert an interesting token
            data[pos:pos] = rng.choice(INTERESTING)
        elif op == 4 and data:  # duplicate a chunk
            a = rng.randrange(len(data))
            chunk = data[a : a + rng.randrange(1, 64)]
            data[pos:pos] = chunk * rng.randrange(1, 20)
        elif op == 5:  # deep nesting
            depth = rng.choice((10, 33, 100, 253, 254, 1100))
            opener, closer = rng.choice(((b"[", b"]"), (b'{"a":', b"}"), (b"<a>", b"</a>")))
            data[pos:pos] = opener * depth + b"1" + closer * depth
        elif op == 6 and data:  # truncate
            del data[pos:]
        elif op == 7:  # a huge field
            size = rng.choice((300, 5000, 70000))
            data[pos:pos] = rng.choice((b"a", b"\xe4\xb8\xad", b"9")) * size
        else:  # replace a byte
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def rss_kib() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


# ------------------------------------------------------------------ in-process targets


def _targets() -> dict[str, tuple[list[bytes], Callable[[bytes], object], tuple[type, ...]]]:
    from gateway.channels.chat import weibo
    from gateway.channels.chat.officialaccount import PayloadError, parse_xml
    from gateway.channels.chat.wechat import decode_message
    from gateway.channels.email.normalize import Envelope, normalize
    from gateway.channels.sms import cmpp, common, generic, smpp, smsbox, twilio
    from gateway.channels.sms import cmpp_pdu as C
    from gateway.channels.sms import smpp_pdu as P
    from gateway.channels.sms.concat import parse_udh
    from gateway.channels.voice.agi import AgiError, parse_header_block
    from gateway.channels.voice.ami import AmiError, FrameReader
    from gateway.channels.web.app import form_to_body, parse_location
    from gateway.channels.web.georeport import Open311Error, Open311Service, parse_request
    from gateway.contact import safejson
    from gateway.records import clean_text
    from gateway.server.intake_api import BadRequest, parse_intake

    now = 1_795_594_483_000_000

    def intake_json(raw: bytes) -> object:
        return parse_intake(safejson.loads(raw), now, "api")

    def app_json(raw: bytes) -> object:
        body = safejson.loads(raw)
        if isinstance(body, dict) and body.get("location") is not None:
            parse_location(body.pop("location"))
        return parse_intake(body, now, "apps")

    def app_form(raw: bytes) -> object:
        fields = dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
        return parse_intake(form_to_body(fields), now, "apps")

    services = {"001": Open311Service(name="Streetlight out")}

    def open311_form(raw: bytes) -> object:
        try:  # as the adapter reads a form: too many fields is its 400
            pairs = parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True,
                              max_num_fields=200)
        except ValueError as exc:
            raise Open311Error(400, "too many form fields") from exc
        return parse_request(dict(pairs), services)

    def telegram(raw: bytes) -> object:
        from telegram import Update

        from gateway.channels.chat.telegram_updates import decode_update

        data = safejson.loads(raw)  # as TelegramAdapter.handle_webhook and take do
        if not isinstance(data, dict) or type(data.get("update_id")) is not int:
            raise ValueError("not an update")
        try:
            update = Update.de_json(data, None)
        except Exception as exc:  # the webhook answers 400 to what PTB cannot build
            raise ValueError("malformed") from exc
        try:
            return decode_update(update, 123456, "hotline_bot")
        except (AttributeError, TypeError, ValueError):  # take() ignores it, logged
            return None

    def wechat_xml(raw: bytes) -> object:
        return decode_message(parse_xml(raw))

    def weibo_json(raw: bytes) -> object:
        return weibo.decode_json(raw)

    def kannel_get(raw: bytes) -> object:
        msg = smsbox.parse_request("GET", raw.decode("latin-1"), {}, b"")
        return smsbox.decode_text(msg.data, msg.coding, msg.charset, ("gb18030",))

    def twilio_form(raw: bytes) -> object:
        return twilio.parse_message(twilio.parse_form(raw))

    names = generic.FieldNames() if hasattr(generic, "FieldNames") else None

    def generic_json(raw: bytes) -> object:
        data = generic.parse_fields("application/json", raw, "")
        return generic.parse_message(data, names, "12345") if names is not None else data

    def smtp_data(raw: bytes) -> object:
        result = normalize(raw, Envelope("citizen@example.org", ("12345@hotline.example",)))
        for value in (result.external_id, result.text, result.subject or "", result.thread or ""):
            value.encode("utf-8")  # every field a contact carries is valid text
        return result

    smpp_config = smpp.SmppConfig(eight_bit_charset="gbk")

    def smpp_pdu(raw: bytes) -> object:
        # as SmppLink._read and handle do: a 16-octet header, then a deliver_sm body, then
        # everything SmppAdapter._take computes before the contact goes to Intake
        if len(raw) < P.FRAMING.size:
            raise P.Malformed("short header")
        length, command_id, _, _ = P.FRAMING.decode(raw[: P.FRAMING.size])
        if length < P.FRAMING.size or length > P.MAX_PDU or command_id != P.DELIVER_SM:
            raise P.Malformed("not a deliver_sm the link would read")
        sm = P.ShortMessage.parse(raw[P.FRAMING.size : length])
        receipt = smpp.receipt_of(sm)
        if receipt is not None:
            return receipt
        sender = smpp.sender_address(sm.source_addr, sm.source_addr_ton, "CN")
        smpp.external_id(sm, "20261201")
        concat, data = smpp.concat_of(sm)
        text, _ = smpp.decode(data, sm.data_coding, smpp_config)
        return sender, concat, clean_text(text).encode("utf-8")

    def cmpp_pdu(raw: bytes) -> object:
        # as CmppLink: a 12-octet header, a CMPP_DELIVER body (2.0 or 3.0 by the first octet)
        if len(raw) < C.FRAMING.size:
            raise C.Malformed("short header")
        length, command_id, _, _ = C.FRAMING.decode(raw[: C.FRAMING.size])
        if length < C.FRAMING.size or length > C.MAX_PACKET or command_id != C.DELIVER:
            raise C.Malformed("not a CMPP_DELIVER the link would read")
        version = C.V30 if raw[-1] & 1 else 0x20
        d = C.Deliver.parse(raw[C.FRAMING.size : length], version)
        if d.registered_delivery == 1:
            report = C.Report.parse(d.msg_content, version)
            return cmpp.report_kind(report.stat)
        sender = common.phone_address(d.src_terminal_id, "CN")
        data = d.msg_content
        if d.tp_udhi and data:
            parse_udh(data[: data[0] + 1])
            data = data[data[0] + 1 :]
        text, _ = cmpp.decode(data, d.msg_fmt)
        return sender, clean_text(text).encode("utf-8")

    def agi_header(raw: bytes) -> object:
        return parse_header_block(raw)

    def ami_events(raw: bytes) -> object:
        reader = FrameReader(greeting=False)
        return reader.feed(raw)

    tg = json.dumps({"update_id": 10, "message": {"message_id": 1, "date": 1795594480,
                     "chat": {"id": 42, "type": "private"}, "from": {"id": 42, "is_bot": False,
                     "first_name": "张"}, "text": "路灯坏了"}}).encode()
    wx = (b"<xml><ToUserName><![CDATA[gh_1]]></ToUserName><FromUserName><![CDATA[o6_bm]]>"
          b"</FromUserName><CreateTime>1795594480</CreateTime><MsgType><![CDATA[text]]></MsgType>"
          b"<Content><![CDATA[\xe8\xb7\xaf\xe7\x81\xaf]]></Content><MsgId>6054768590064713728"
          b"</MsgId></xml>")
    mail = (b"From: =?utf-8?b?5byg5LiJ?= <citizen@example.org>\r\nTo: 12345@hotline.example\r\n"
            b"Subject: =?gb2312?b?wrfDxruvwcs=?=\r\nMessage-ID: <a1@example.org>\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
            b"Content-Type: text/plain; charset=gb18030\r\n\r\n\xc2\xb7\xb5\xc6\xbb\xb5\xc1\xcb\r\n"
            b"--b\r\nContent-Type: image/png; name=a.png\r\nContent-Transfer-Encoding: base64\r\n"
            b"\r\niVBORw0KGgo=\r\n--b--\r\n")
    agi = (b"agi_network: yes\nagi_network_script: intake?queue=hotline\nagi_request: "
           b"agi://127.0.0.1/intake\nagi_channel: PJSIP/trunk-00000001\nagi_callerid: "
           b"13800138000\nagi_calleridname: unknown\nagi_dnid: 12345\nagi_uniqueid: 1795594480.1"
           b"\nagi_arg_1: x\n")
    ami = (b"Event: Newchannel\r\nPrivilege: call,all\r\nChannel: PJSIP/trunk-00000001\r\n"
           b"CallerIDNum: 13800138000\r\nUniqueid: 1795594480.1\r\nLinkedid: 1795594480.1\r\n"
           b"\r\nEvent: QueueCallerJoin\r\nQueue: hotline\r\nPosition: 1\r\n\r\n")
    smpp_seed = P.Pdu(P.DELIVER_SM, 0, 7, P.ShortMessage(
        "13800138000", "12345", "\u8def\u706f".encode("utf-16-be"), source_addr_ton=1,
        data_coding=8,
        tlvs={P.TLV_SAR_MSG_REF_NUM: b"\x00\x01", P.TLV_SAR_TOTAL_SEGMENTS: b"\x02",
              P.TLV_SAR_SEGMENT_SEQNUM: b"\x01"}).body()).encode()
    smpp_udh = P.Pdu(P.DELIVER_SM, 0, 8, P.ShortMessage(
        "8613800138000", "12345", b"\x05\x00\x03\x2a\x02\x01" + "路灯".encode("gbk"),
        esm_class=P.ESM_UDHI, data_coding=15).body()).encode()
    smpp_receipt = P.Pdu(P.DELIVER_SM, 0, 9, P.ShortMessage(
        "13800138000", "12345", b"id:0123456789 sub:001 dlvrd:001 submit date:2612011000 done "
        b"date:2612011001 stat:DELIVRD err:000 text:x", esm_class=0x04).body()).encode()
    cmpp_seeds = [
        C.Packet(C.DELIVER, 5, C.Deliver(1 << 40, "10658012345", "13800138000",
                 "路灯坏了".encode("utf-16-be"), msg_fmt=8).encode(v)).encode() + bytes([odd])
        for v, odd in ((0x20, 0), (C.V30, 1))
    ] + [
        C.Packet(C.DELIVER, 6, C.Deliver(2, "10658012345", "8613800138000",
                 b"\x05\x00\x03\x2a\x02\x02" + "井盖".encode("gbk"), msg_fmt=15,
                 tp_udhi=1).encode(0x20)).encode() + b"\x00",
        C.Packet(C.DELIVER, 7, C.Deliver(3, "10658012345", "13800138000", C.Report(
                 9, "DELIVRD", "2612011000", "2612011001", "13800138000", 1).encode(C.V30),
                 registered_delivery=1).encode(C.V30)).encode() + b"\x01",
    ]
    json_errors = (safejson.BadJson, BadRequest)
    return {
        "intake-json": ([b'{"channel":"sms","sender":"+8613800138000","text":"\\u8def\\u706f",'
                         b'"meta":{"a":[1,2,{"b":null}]},"external_id":"x1"}'], intake_json,
                        json_errors),
        "app-json": ([b'{"text":"pothole","location":{"lat":31.2,"lon":121.4,"accuracy_m":5},'
                      b'"confidential":true}'], app_json, (*json_errors, ValueError)),
        "app-form": ([b"text=pothole&lat=31.2&lon=121.4&sender=%2B8613800138000"], app_form,
                     (BadRequest, ValueError)),
        "open311-form": ([b"api_key=k&service_code=001&lat=31.2&long=121.4&description=light"
                          b"&attribute%5BX%5D=1&email=a%40b.cn"], open311_form, (Open311Error,)),
        "telegram-update": ([tg], telegram, (safejson.BadJson, ValueError, KeyError, TypeError)),
        "wechat-xml": ([wx], wechat_xml, (PayloadError,)),
        "weibo-json": ([b'{"type":"text","sender_id":"1","receiver_id":"2","created_at":'
                        b'"Mon Nov 30 10:00:00 +0800 2026","text":"\\u4e95\\u76d6",'
                        b'"data":{"a":1}}'], weibo_json, (PayloadError,)),
        "kannel-query": ([b"from=%2B8613800138000&to=12345&text=%C2%B7&coding=2&charset=UTF-16BE"
                          b"&smsc=gsm&udh=%05%00%03%01%02%01"], kannel_get, (common.BadRequest,)),
        "twilio-form": ([b"MessageSid=SM1&From=%2B8613800138000&To=%2B861&Body=hi&NumMedia=1"
                         b"&MediaUrl0=http%3A%2F%2Fx&MediaContentType0=image%2Fpng"], twilio_form,
                        (common.BadRequest,)),
        "sms-webhook-json": ([b'{"from":"+8613800138000","to":"12345","text":"hi","id":"1"}'],
                             generic_json, (common.BadRequest,)),
        "smtp-data": ([mail], smtp_data, ()),
        "agi-header": ([agi], agi_header, (AgiError,)),
        "ami-events": ([ami], ami_events, (AmiError,)),
        # BadRequest (no source number) is answered as a permanent error by both adapters
        "smpp-pdu": ([smpp_seed, smpp_udh, smpp_receipt], smpp_pdu,
                     (P.Malformed, common.BadRequest)),
        "cmpp-pdu": (cmpp_seeds, cmpp_pdu, (C.Malformed, common.BadRequest)),
    }


class Progress:
    """Counts of one target, written to the checkpoint file now and then and at the end.

    RSS is sampled at the start, after the first 2,000 inputs (imports and caches settled: the
    base to compare with), at every tenth of the way and at the end, so a flat line and a slow
    climb look different even when a run is cut short.
    """

    def __init__(self, name: str, kind: str, planned: int, checkpoint: Path | None) -> None:
        self.result: dict[str, Any] = {
            "target": name, "kind": kind, "inputs": 0, "crashes": 0, "hangs": 0,
            "rss_start_kib": rss_kib(), "rss_after_2000_kib": 0, "rss_mid_kib": 0,
            "rss_end_kib": 0, "rss_samples_kib": [], "seconds": 0.0, "examples": [],
            "finished": False,
        }
        self.planned = planned
        self.checkpoint = checkpoint
        self.started = time.perf_counter()
        self._next_sample = max(planned // 10, 1)
        self._next_write = self.started + 10

    def step(self, n: int) -> None:
        """Call with the number of inputs so far (cheap unless a sample or write is due)."""
        r = self.result
        r["inputs"] = n
        if n >= 2000 and not r["rss_after_2000_kib"]:
            r["rss_after_2000_kib"] = rss_kib()
        if n >= self._next_sample:
            self._next_sample += max(self.planned // 10, 1)
            r["rss_samples_kib"].append([n, rss_kib()])
            if n >= self.planned // 2 and not r["rss_mid_kib"]:
                r["rss_mid_kib"] = rss_kib()
        now = time.perf_counter()
        if now >= self._next_write:
            self._next_write = now + 10
            self.write()

    def crash(self, text: str, kind: str = "") -> None:
        """Count one; keep the first example of each kind (exception type and place)."""
        self.result["crashes"] += 1
        kinds = self.result.setdefault("crash_kinds", {})
        kind = kind or text[:60]
        if kind not in kinds and len(kinds) < 10:
            self.result["examples"].append(text)
        kinds[kind] = kinds.get(kind, 0) + 1

    def write(self, finished: bool = False) -> None:
        r = self.result
        r["seconds"] = round(time.perf_counter() - self.started, 1)
        r["rss_end_kib"] = rss_kib()
        r["finished"] = finished
        if not r["rss_mid_kib"] and finished:
            r["rss_mid_kib"] = r["rss_end_kib"]
        if self.checkpoint is None:
            return
        try:
            board = json.loads(self.checkpoint.read_text())
        except (OSError, ValueError):
            board = {}
        board[r["target"]] = r
        tmp = self.checkpoint.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(board, ensure_ascii=False, indent=1))
        tmp.replace(self.checkpoint)

    def done(self) -> dict[str, Any]:
        self.write(finished=True)
        return self.result


def run_inprocess(name: str, seeds: list[bytes], parse: Callable[[bytes], object],
                  expected: tuple[type, ...], seconds: float, max_inputs: int, hang_s: float,
                  rng: random.Random, checkpoint: Path | None = None) -> dict[str, Any]:
    progress = Progress(name, "in-process", max_inputs, checkpoint)
    started = progress.started
    n = 0
    while n < max_inputs and time.perf_counter() - started < seconds:
        raw = mutate(rng.choice(seeds), rng) if n % 50 else rng.randbytes(rng.randrange(200))
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            parse(raw)
        except expected:
            pass
        except Exception as exc:
            tb = traceback.extract_tb(exc.__traceback__)[-1]
            progress.crash(f"{type(exc).__name__}: {exc!s:.120} <- {raw[:120]!r}"
                           + traceback.format_exc(limit=-2)[-300:],
                           f"{type(exc).__name__} at {Path(tb.filename).name}:{tb.lineno}")
        took, cpu = time.perf_counter() - t0, time.process_time() - c0
        if took > hang_s:
            # A parser that loops burns CPU; a nice'd process on a loaded machine merely waits:
            # a hang is CPU time over the bound, a wall-clock wait alone a "stall" (counted).
            kind = "hangs" if cpu > hang_s else "stalls"
            progress.result[kind] = progress.result.get(kind, 0) + 1
            progress.result.setdefault(f"{kind}_examples", []).append(
                f"{took:.1f} s wall, {cpu:.2f} s CPU, {len(raw)} bytes: {raw[:80]!r}")
            del progress.result[f"{kind}_examples"][3:]
        n += 1
        progress.step(n)
    return progress.done()


# ------------------------------------------------------------------ SMTP protocol, in-process

SMTP_COMMANDS = [
    b"EHLO client.example.org", b"HELO client.example.org", b"MAIL FROM:<citizen@example.org>",
    b"MAIL FROM:<citizen@example.org> SIZE=1000 BODY=8BITMIME SMTPUTF8", b"MAIL FROM:<>",
    b"RCPT TO:<12345@hotline.example>", b"RCPT TO:<12345+tag@HOTLINE.example.>",
    b"RCPT TO:<other@elsewhere.example>", b"RSET", b"NOOP", b"VRFY citizen", b"HELP",
    b"EXPN list", b"AUTH PLAIN AGNpdGl6ZW4AcHc=", b"STARTTLS", b"DATA",
    "RCPT TO:<市长@hotline.example>".encode(),
]
SMTP_MESSAGE = (b"From: =?utf-8?b?5byg5LiJ?= <citizen@example.org>\r\nTo: 12345@hotline.example"
                b"\r\nSubject: =?gb2312?b?wrfDxruvwcs=?=\r\nMessage-ID: <m1@example.org>\r\n"
                b"Content-Type: text/plain; charset=gb18030\r\n\r\n\xc2\xb7\xb5\xc6\r\n")


async def run_smtp_protocol(seconds: float, max_inputs: int, hang_s: float, rng: random.Random,
                            checkpoint: Path | None = None, tag: str = "") -> dict[str, Any]:
    """SMTP commands and DATA through the listener's real protocol object (aiosmtpd's SMTP with
    the gateway's Handler and limits), many inputs per session over a loopback socket.

    The Handler hands each message to the real ``normalize`` (what EmailAdapter.accept parses
    with) instead of a queue: this target is the protocol and the parser, the write path has its
    own tests. Each command line and each message is one input. A crash is an answer from the
    catch-alls (``451 4.3.0``: aiosmtpd's handle_exception or our handler's last resort) or an
    exception logged by the gateway's own loggers; a hang is a reply not seen within ``hang_s``.
    """
    import logging

    from gateway.channels.email.common import EmailConfig
    from gateway.channels.email.normalize import Envelope as MailEnvelope
    from gateway.channels.email.normalize import normalize
    from gateway.channels.email.smtp import Handler, Listener
    from gateway.server.config import HostPort

    progress = Progress("smtp-session" + tag, "in-process protocol", max_inputs, checkpoint)
    r = progress.result
    r["replies"] = {}
    r["sessions"] = 0
    r["messages"] = 0
    errors: list[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR:
                errors.append(record)

    catch = Catch()
    logging.getLogger("gateway").addHandler(catch)
    logging.getLogger("mail.log").addHandler(catch)
    config = EmailConfig(listen=HostPort("127.0.0.1", 0), hostname="gw.example",
                         mailboxes=("12345@hotline.example",), max_message_size=1 << 20)
    count = 0

    async def accept(raw: bytes, env: MailEnvelope) -> str:
        nonlocal count
        result = normalize(raw, env)
        for value in (result.external_id, result.text, result.subject or ""):
            value.encode("utf-8")
        count += 1
        return f"c{count}"

    class Recording(Handler):
        async def handle_exception(self, error: Exception) -> str:
            """aiosmtpd's catch-all (answers 451 4.3.0): keep where it was raised."""
            tb = traceback.extract_tb(error.__traceback__)
            where = "; ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in tb[-3:])
            kinds = r.setdefault("exception_kinds", {})
            kinds[f"{type(error).__name__}: {where}"] = kinds.get(
                f"{type(error).__name__}: {where}", 0) + 1
            return await super().handle_exception(error)

    listener = Listener(config, Recording(config, accept))
    await listener.start()
    logging.getLogger("mail.log").setLevel(logging.ERROR)  # not every bogus command echoed
    n = 0
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None

    async def reply() -> bytes:
        assert reader is not None
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("closed")
            if len(line) < 4 or line[3:4] != b"-":
                code = line[:3].decode("latin-1")
                r["replies"][code] = r["replies"].get(code, 0) + 1
                if line.startswith(b"451 4.3.0"):
                    progress.crash(line.decode("latin-1").strip())
                return line

    started = progress.started
    try:
        while n < max_inputs and time.perf_counter() - started < seconds:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
                r["sessions"] += 1
                try:
                    async with asyncio.timeout(hang_s):
                        await reply()
                except TimeoutError:
                    r["hangs"] += 1
            assert writer is not None
            if rng.random() < 0.6:  # a well-formed transaction, its parts sometimes mutated
                lines = [b"EHLO client.example.org"] * (rng.random() < 0.3) + [
                    SMTP_COMMANDS[2 + rng.randrange(3)], SMTP_COMMANDS[5 + rng.randrange(3)],
                    b"DATA"]
            else:
                lines = [rng.choice(SMTP_COMMANDS) for _ in range(rng.randrange(1, 6))]
            try:
                async with asyncio.timeout(hang_s):
                    for line in lines:
                        if rng.random() < 0.25:
                            line = mutate(line, rng)
                        line = line.replace(b"\r", b"").replace(b"\n", b"")
                        writer.write(line + b"\r\n")
                        n += 1
                        answer = await reply()
                        if answer.startswith(b"354"):
                            message = mutate(SMTP_MESSAGE, rng) if rng.random() < 0.9 else b""
                            if message.startswith(b"."):
                                message = b"." + message
                            writer.write(message.replace(b"\n.", b"\n..") + b"\r\n.\r\n")
                            n += 1
                            r["messages"] += 1
                            await reply()
                        elif answer.startswith((b"221", b"421")):
                            raise ConnectionError("closed by the server")
            except TimeoutError:
                r["hangs"] += 1
                writer.close()
                writer = None
            except (ConnectionError, OSError):
                writer.close()
                writer = None
            progress.step(n)
        # the listener still serves a clean session after all that
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        async with asyncio.timeout(hang_s):
            await reply()
            for line in (b"EHLO x", b"MAIL FROM:<a@b.example>", b"RCPT TO:<12345@hotline.example>",
                         b"DATA"):
                writer.write(line + b"\r\n")
                await reply()
            writer.write(b"Subject: ok\r\n\r\nfine\r\n.\r\nQUIT\r\n")
            r["still_serving"] = (await reply()).startswith(b"250")
        writer.close()
    finally:
        await listener.stop()
        logging.getLogger("gateway").removeHandler(catch)
        logging.getLogger("mail.log").removeHandler(catch)
    for record in errors[:3]:
        progress.crash(f"logged: {record.name}: {record.getMessage()[:200]}")
    r["crashes"] += max(len(errors) - 3, 0)
    return progress.done()


# ------------------------------------------------------------------ socket targets


async def run_sockets(seconds: float, hang_s: float, rng: random.Random, concurrency: int,
                      redis_url: str = "", prefix: str = "fuzz",
                      only: Collection[str] = ()) -> list[dict[str, Any]]:
    import aiohttp

    from gateway.server.config import parse_settings
    from gateway.server.runtime import Gateway

    tmp = Path(tempfile.mkdtemp(prefix="fuzz-"))
    raw_cfg = {
        "gateway": {"data_dir": str(tmp / "data"), "instance": "fuzz"},
        "redis": {"prefix": prefix, "url": redis_url},
        "http": {"listen": "127.0.0.1:0"},
        "api": {"open_to_loopback": True},
        "limits": {"sender_contacts": 0},
        "adapters": {
            "wx": {"type": "wechat", "app_id": "wx1", "token": "t", "verify": False},
            "wb": {"type": "weibo", "app_secret": "s", "verify": False},
            "kannel": {"type": "kannel", "allow_from": ["127.0.0.1"]},
            "apps": {"type": "app", "apps": {"a": {"key": "app-key-0123456789"}}},
            "o311": {"type": "open311", "services": {"001": {"name": "Light"}},
                     "require_api_key": False},
            "mail": {"type": "smtp", "listen": "127.0.0.1:0",
                     "mailboxes": ["12345@hotline.example"]},
            "pbx": {"type": "asterisk", "agi_listen": "127.0.0.1:0"},
        },
    }
    settings, configs = parse_settings(raw_cfg, "<fuzz>")
    gw = Gateway(settings, configs)
    await gw.start()
    port = gw.http_port
    assert gw.http is not None
    results: list[dict[str, Any]] = []
    http_targets = [
        ("http /v1/intake", "/v1/intake", {"Content-Type": "application/json"},
         b'{"text":"hi","sender":"+8613800138000","meta":{"a":[1]}}'),
        ("http app", "/v1/apps/a/contacts", {"Authorization": "Bearer app-key-0123456789",
         "Content-Type": "application/json"}, b'{"text":"pothole","location":{"lat":1,"lon":2}}'),
        ("http open311", "/open311/v2/requests.json",
         {"Content-Type": "application/x-www-form-urlencoded"},
         b"service_code=001&lat=31.2&long=121.4&description=light"),
        ("http wechat", "/chat/wechat/wx?signature=x&timestamp=1&nonce=1",
         {"Content-Type": "text/xml"},
         b"<xml><ToUserName>gh</ToUserName><FromUserName>o6</FromUserName><CreateTime>1"
         b"</CreateTime><MsgType>text</MsgType><Content>hi</Content><MsgId>1</MsgId></xml>"),
        ("http weibo", "/chat/weibo/wb?signature=x&timestamp=1&nonce=1",
         {"Content-Type": "application/json"},
         b'{"type":"text","sender_id":"1","receiver_id":"2","text":"hi","data":{}}'),
        ("http kannel", "/sms/kannel?from=%2B8613800138000&to=12345&text=hi&id=1",
         {"Content-Type": "text/plain"}, b""),
    ]
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=hang_s)) as http:
            for name, path, headers, seed in http_targets:
                if only and name not in only:
                    continue
                results.append(await _http_campaign(http, port, name, path, headers, seed,
                                                    seconds, rng, concurrency))
        if not only or "smtp commands + DATA" in only:
            results.append(await _smtp_campaign(gw.adapters["mail"].port, seconds, hang_s, rng))
        if not only or "fastagi header blocks" in only:
            results.append(await _agi_campaign(gw.adapters["pbx"].server.port, seconds, hang_s,
                                               rng))
    finally:
        await gw.stop()
    return results


async def _http_campaign(http: Any, port: int, name: str, path: str, headers: dict[str, str],
                         seed: bytes, seconds: float, rng: random.Random,
                         concurrency: int) -> dict[str, Any]:
    rss_start = rss_kib()
    started = time.perf_counter()
    statuses: dict[int, int] = {}
    hangs = errors = n = 0
    base = f"http://127.0.0.1:{port}"

    async def worker() -> None:
        nonlocal hangs, errors, n
        while time.perf_counter() - started < seconds:
            target = path
            if "?" in path and rng.random() < 0.3:  # the query string is outside bytes too
                head, _, query = path.partition("?")
                target = head + "?" + mutate(query.encode(), rng).decode("latin-1").replace(
                    " ", "%20").replace("#", "%23")
            body = mutate(seed, rng)
            n += 1
            try:
                async with http.post(base + target, data=body, headers=headers) as resp:
                    await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
            except TimeoutError:
                hangs += 1
            except Exception:
                errors += 1  # a request the client could not even send (invalid URL)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"target": name, "kind": "socket", "inputs": n,
            "status_500": sum(v for k, v in statuses.items() if k >= 500 and k != 503),
            "statuses": dict(sorted(statuses.items())), "hangs": hangs,
            "client_errors": errors, "rss_start_kib": rss_start, "rss_end_kib": rss_kib(),
            "seconds": round(time.perf_counter() - started, 1)}


async def _smtp_campaign(port: int, seconds: float, hang_s: float,
                         rng: random.Random) -> dict[str, Any]:
    rss_start = rss_kib()
    started = time.perf_counter()
    n = hangs = bad = 0
    codes: dict[str, int] = {}
    commands = [b"EHLO client.example.org", b"MAIL FROM:<citizen@example.org> SIZE=100",
                b"RCPT TO:<12345@hotline.example>", b"DATA"]
    message = (b"From: citizen@example.org\r\nTo: 12345@hotline.example\r\nSubject: x\r\n"
               b"Message-ID: <m1@example.org>\r\n\r\nstreet light broken\r\n")
    while time.perf_counter() - started < seconds:
        session = [mutate(c, rng) if rng.random() < 0.3 else c for c in commands]
        data = mutate(message, rng).replace(b"\r\n.\r\n", b"\r\n..\r\n")
        n += 1
        try:
            async with asyncio.timeout(hang_s):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                await reader.readline()
                for line in session:
                    writer.write(line.replace(b"\r", b"").replace(b"\n", b"") + b"\r\n")
                writer.write(data + b"\r\n.\r\nQUIT\r\n")
                await writer.drain()
                replies = await reader.read()
                writer.close()
        except TimeoutError:
            hangs += 1
            continue
        except OSError:
            bad += 1
            continue
        for line in replies.split(b"\r\n"):
            if line[:3].isdigit():
                codes[line[:1].decode() + "xx"] = codes.get(line[:1].decode() + "xx", 0) + 1
    return {"target": "smtp commands + DATA", "kind": "socket", "inputs": n, "hangs": hangs,
            "connection_errors": bad, "reply_classes": codes, "rss_start_kib": rss_start,
            "rss_end_kib": rss_kib(), "seconds": round(time.perf_counter() - started, 1)}


async def _agi_campaign(port: int, seconds: float, hang_s: float,
                        rng: random.Random) -> dict[str, Any]:
    rss_start = rss_kib()
    started = time.perf_counter()
    n = hangs = answered = 0
    block = (b"agi_network: yes\nagi_network_script: intake\nagi_request: agi://127.0.0.1/intake"
             b"\nagi_channel: PJSIP/trunk-00000001\nagi_callerid: 13800138000\nagi_dnid: 12345\n"
             b"agi_uniqueid: 1795594480.%d\n\n")
    while time.perf_counter() - started < seconds:
        n += 1
        raw = mutate(block % n, rng)
        try:
            async with asyncio.timeout(hang_s):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(raw + b"\n\n")
                await writer.drain()
                while await reader.readline():  # answer every command "200 result=1"
                    answered += 1
                    writer.write(b"200 result=1\n")
                writer.close()
        except TimeoutError:
            hangs += 1
        except OSError:
            pass
    return {"target": "fastagi header blocks", "kind": "socket", "inputs": n, "hangs": hangs,
            "commands_answered": answered, "rss_start_kib": rss_start, "rss_end_kib": rss_kib(),
            "seconds": round(time.perf_counter() - started, 1)}


# ------------------------------------------------------------------ main


def report(board: dict[str, dict[str, Any]]) -> str:
    """A checkpoint file as the table of docs/reliability.md."""
    rows = ["| target | inputs | reached 1,000,000 | time | crashes | hangs | RSS MiB: after 2,000"
            " → middle → end |", "|---|---|---|---|---|---|---|"]
    for name, r in sorted(board.items(), key=lambda kv: -int(kv[1]["inputs"])):
        mib = [round(int(r.get(k) or 0) / 1024) for k in ("rss_after_2000_kib", "rss_mid_kib",
                                                          "rss_end_kib")]
        reached = "yes" if r["inputs"] >= 1_000_000 else "no"
        rows.append(f"| {name} | {int(r['inputs']):,} | {reached}"
                    f" | {float(r['seconds']) / 60:.0f} min | {r['crashes']} | {r['hangs']} |"
                    f" {mib[0]} → {mib[1] or '–'} → {mib[2]} |")
    return "\n".join(rows)


def _isolated(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run one target in a child process; a child that dies counts as a crash."""
    import subprocess

    argv = [sys.executable, __file__, "--only", "inprocess", "--target", name,
            "--seconds", str(args.seconds), "--max-inputs", str(args.max_inputs),
            "--hang", str(args.hang), "--seed", str(args.seed + sum(name.encode())),
            "--tag", args.tag]
    if args.checkpoint is not None:
        argv += ["--checkpoint", str(args.checkpoint)]
    proc = subprocess.run(argv, capture_output=True, text=True)  # noqa: S603 - our own argv
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for line in lines:
        print(json.dumps(line, ensure_ascii=False), flush=True)
    if proc.returncode not in (0, 1) or not lines:
        return [{"target": name, "kind": "in-process", "crashes": 1,
                 "examples": [f"exit {proc.returncode}: {proc.stderr[-500:]}"]}]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30, help="per in-process target")
    ap.add_argument("--max-inputs", type=int, default=1_000_000, help="per in-process target")
    ap.add_argument("--socket-seconds", type=float, default=30, help="per socket target")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--hang", type=float, default=10.0,
                    help="seconds that count as a hang (WeChat answers a push it could not"
                    " make durable only after its 5 s, on purpose)")
    ap.add_argument("--only", choices=["inprocess", "socket"], default=None)
    ap.add_argument("--target", action="append", default=[], help="in-process target name")
    ap.add_argument("--seed", type=int, default=20261201)
    ap.add_argument("--smoke", action="store_true", help="a few seconds of everything")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="keep each target's counts here, updated every 10 s (a cut run still"
                    " has its figures)")
    ap.add_argument("--tag", default="", help="appended to target names in the figures (a"
                    " second run of a target with another seed)")
    ap.add_argument("--report", type=Path, default=None,
                    help="print a checkpoint file as a markdown table, run nothing")
    ap.add_argument("--isolate", action="store_true",
                    help="each in-process target in its own process (its own RSS)")
    args = ap.parse_args()
    if args.report is not None:
        print(report(json.loads(args.report.read_text())))
        return 0
    import logging

    logging.basicConfig(level=logging.ERROR)  # the listeners' refusals are expected, errors not
    # aiohttp logs its own 400s (a request line over 8190 bytes) at ERROR: answered, not errors
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    if args.smoke:
        args.seconds, args.max_inputs, args.socket_seconds = 0.5, 2000, 0.5
    rng = random.Random(args.seed)
    results: list[dict[str, Any]] = []
    if args.only in (None, "inprocess"):
        names = [*_targets(), "smtp-session"]
        for name in names:
            if args.target and name not in args.target:
                continue
            if args.isolate:
                results.extend(_isolated(name, args))
                continue
            if name == "smtp-session":
                result = asyncio.run(run_smtp_protocol(args.seconds, args.max_inputs, args.hang,
                                                       rng, args.checkpoint, args.tag))
            else:
                seeds, parse, expected = _targets()[name]
                result = run_inprocess(name + args.tag, seeds, parse, expected, args.seconds,
                                       args.max_inputs, args.hang, rng, args.checkpoint)
            results.append(result)
            print(json.dumps(result, ensure_ascii=False), flush=True)
    if args.only in (None, "socket"):
        for result in asyncio.run(run_sockets(args.socket_seconds, args.hang, rng,
                                              args.concurrency)):
            results.append(result)
            print(json.dumps(result, ensure_ascii=False), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, ensure_ascii=False, indent=1))
    failed = [r["target"] for r in results
              if r.get("crashes") or r.get("hangs") or r.get("status_500")]
    if failed:
        print("FAILED: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
