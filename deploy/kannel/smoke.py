"""End-to-end check of kannel.conf against a real Kannel, on one machine, in about 20 seconds.

Runs bearerbox and smsbox with this folder's kannel.conf, its SMPP link swapped for Kannel's
fake SMSC, and a gateway with the Kannel adapter; then, through ``fakesmsc`` (Kannel's test
SMSC client): a UCS-2 message with an emoji, and a long GBK message in three 8-bit parts sent
out of order; it checks the contacts on the stream, the acknowledgement the handset gets back,
a reply through sendsms and its delivery report.

    apt-get install kannel kannel-extras          # Debian: bearerbox, smsbox, fakesmsc
    .venv/bin/python deploy/kannel/smoke.py              # parts joined by the gateway
    .venv/bin/python deploy/kannel/smoke.py --combine    # parts joined by Kannel itself
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote_from_bytes

import orjson

HERE = Path(__file__).resolve().parent
FAKESMSC = "/usr/lib/kannel/test/fakesmsc"
UCS2_TEXT = "你好，路灯坏了一个星期🙂"
LONG_TEXT = "第一段内容，第二段内容，第三段结尾。"
ACK = "已收到，编号{ref}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def smoke_conf(tmp: Path, ports: dict[str, int], combine: bool) -> str:
    """kannel.conf with a fake SMSC, local ports, files under ``tmp`` and the smoke password."""
    src = (HERE / "kannel.conf").read_text(encoding="utf-8")
    start = src.index("group = smsc")
    end = src.index("\n\n", start) + 2
    fake = (
        f"group = smsc\nsmsc = fake\nsmsc-id = operator1\nport = {ports['smsc']}\n"
        "connect-allow-ip = 127.0.0.1\n\n"
    )
    conf = src[:start] + fake + src[end:]
    replacements = {
        "admin-port = 13000": f"admin-port = {ports['admin']}",
        "smsbox-port = 13001": f"smsbox-port = {ports['box']}",
        "sendsms-port = 13013": f"sendsms-port = {ports['sendsms']}",
        '"/var/log/kannel/': f'"{tmp}/',
        "http://127.0.0.1:8080/": f"http://127.0.0.1:{ports['http']}/",
        "password = CHANGE-ME-sendsms": "password = smoke-sendsms",
        "sms-combine-concatenated-mo = true":
            f"sms-combine-concatenated-mo = {str(combine).lower()}",
    }
    for old, new in replacements.items():
        if old not in conf:
            raise SystemExit(f"kannel.conf changed: {old!r} not found")
        conf = conf.replace(old, new)
    return conf


def fakesmsc(port: int, message: str, stay_s: float = 2.5) -> None:
    """Send one MO message; stay connected a moment (it receives the answers), then leave:
    the fake SMSC serves one client at a time."""
    proc = subprocess.Popen(  # noqa: S603 (Kannel's own test client)
        [FAKESMSC, "-H", "127.0.0.1", "-r", str(port), "-m", "1", message],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        proc.wait(timeout=stay_s)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait(timeout=10)


def start_box(box: str, conf: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # noqa: S603
        [box, "-v", "2", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


async def wait_for(predicate: object, what: str, seconds: float = 20.0) -> None:
    for _ in range(int(seconds * 10)):
        if await predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def main(combine: bool) -> int:
    from gateway.server.config import parse_settings
    from gateway.server.runtime import Gateway

    for tool in ("bearerbox", "smsbox"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install kannel kannel-extras")
    ports = {k: free_port() for k in ("admin", "box", "sendsms", "smsc", "http")}
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        (tmp / "spool").mkdir()
        conf = tmp / "kannel.conf"
        conf.write_text(smoke_conf(tmp, ports, combine), encoding="utf-8")
        settings, configs = parse_settings({
            "gateway": {"data_dir": str(tmp / "gw"), "instance": "kannel-smoke"},
            "redis": {"prefix": "smoke"},
            "http": {"listen": f"127.0.0.1:{ports['http']}",
                     "public_url": f"http://127.0.0.1:{ports['http']}"},
            "adapters": {"kannel": {
                "type": "kannel", "path": "/sms/kannel", "allow_from": ["127.0.0.1"],
                "ack_text": ACK,
                "sendsms_url": f"http://127.0.0.1:{ports['sendsms']}/cgi-bin/sendsms",
                "sendsms_username": "gateway", "sendsms_password": "smoke-sendsms",
            }},
        })
        gw = Gateway(settings, configs)
        await gw.start()
        failures: list[str] = []

        def check(ok: bool, label: str) -> None:
            print(("PASS " if ok else "FAIL ") + label)
            if not ok:
                failures.append(label)

        try:
            for box in ("bearerbox", "smsbox"):
                procs.append(await asyncio.to_thread(start_box, box, conf))
                await asyncio.sleep(1.5)

            ucs2 = quote_from_bytes(UCS2_TEXT.encode("utf-16-be"), safe="")
            await asyncio.to_thread(fakesmsc, ports["smsc"], f"+8613800138000 12345 ucs2 {ucs2}")
            data = LONG_TEXT.encode("gbk")
            cuts = [0, 11, 23, len(data)]  # a GBK character straddles each boundary
            for seq in (3, 1, 2):
                udh = quote_from_bytes(bytes([5, 0, 3, 0x42, 3, seq]), safe="")
                chunk = quote_from_bytes(data[cuts[seq - 1]:cuts[seq]], safe="")
                await asyncio.to_thread(
                    fakesmsc, ports["smsc"], f"13800138001 12345 udh {udh} {chunk}")

            async def two_contacts() -> bool:
                return len(await gw.read_contacts()) >= 2

            await wait_for(two_contacts, "two contacts")
            contacts = {c.sender.address: c for c in await gw.read_contacts()}
            first = contacts.get("+8613800138000")
            check(first is not None and first.text == UCS2_TEXT, "UCS-2 text with emoji")
            check(first is not None and first.meta.get("smsc") == "operator1", "smsc id (%i)")
            long = contacts.get("+8613800138001")
            check(long is not None and long.text == LONG_TEXT, "long GBK message, parts joined")
            if long is not None and not combine:
                check(long.meta.get("concat", {}).get("parts") == [1, 2, 3],
                      "parts assembled by the gateway")
            acks = [e for e in await gw.read_events() if e.type == "acknowledged"]
            check(len(acks) == 2, "both contacts acknowledged")

            assert first is not None
            # A handset that stays connected to take the reply (the fake SMSC needs a client).
            handset = subprocess.Popen(  # noqa: S603, ASYNC220
                [FAKESMSC, "-H", "127.0.0.1", "-r", str(ports["smsc"]), "-m", "0", "x y text x"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            procs.append(handset)
            await gw.redis.xadd(gw.keys.replies, {"reply": orjson.dumps(
                {"contact_id": first.id, "text": "您好，已派单处理。", "id": "smoke-1"})})

            async def delivered() -> bool:
                return any(e.type == "delivered" for e in await gw.read_events())

            await wait_for(delivered, "a delivery report")
            events = [e for e in await gw.read_events() if e.contact_id == first.id]
            kinds = [e.type for e in events]
            check("responded" in kinds, "reply accepted by sendsms (responded)")
            check("delivered" in kinds, "dlr-url delivery report (delivered)")
            access = (tmp / "access.log").read_text(encoding="utf-8", errors="replace")
            check("[flags:-1:2:" in access, "acknowledgement and reply sent as UCS-2 (coding 2)")
        finally:
            for proc in reversed(procs):
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
            await gw.stop()
    print("kannel smoke:", "OK" if not failures else f"{len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--combine", action="store_true",
                        help="let Kannel join concatenated parts (sms-combine-concatenated-mo)")
    sys.exit(asyncio.run(main(parser.parse_args().combine)))
