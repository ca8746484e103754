"""The part assembler on its own: UDH parsing, durability, retries, reference reuse."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from gateway.channels.sms.concat import Assembler, Concat, Part, assembled_id, parse_udh
from gateway.contact.clock import FixedClock
from gateway.queueing.coordination import SharedState
from gateway.queueing.keys import Keys

UDH_CASES = [
    ("8-bit reference", bytes([5, 0, 3, 0x42, 3, 2]), Concat(0x42, 3, 2)),
    ("16-bit reference", bytes([6, 8, 4, 0x12, 0x34, 2, 1]), Concat(0x1234, 2, 1)),
    ("after another element", bytes([9, 0x0A, 2, 0, 0, 0, 3, 7, 4, 4]), Concat(7, 4, 4)),
    ("part number 0", bytes([5, 0, 3, 1, 3, 0]), None),
    ("part past total", bytes([5, 0, 3, 1, 3, 4]), None),
    ("truncated", bytes([5, 0, 3, 1]), None),
    ("no concatenation element", bytes([4, 0x0A, 2, 0, 0]), None),
    ("empty", b"", None),
]


@pytest.mark.parametrize(("label", "udh", "expected"), UDH_CASES, ids=[c[0] for c in UDH_CASES])
def test_parse_udh(label: str, udh: bytes, expected: Concat | None) -> None:
    assert parse_udh(udh) == expected


def part(seq: int, text: str, pid: str, total: int = 3, at: int = 0) -> Part:
    return Part(group="+8613800138000|12345|5|3", seq=seq, total=total, external_id=pid,
                data=text.encode(), charset="utf-8", received_at=1_000 + at, origin_at=None,
                sender="+8613800138000", recipient="12345")


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], bool]] = []
        self.fail = False

    async def __call__(self, parts: list[Part], complete: bool) -> str:
        if self.fail:
            raise RuntimeError("intake unavailable")
        self.calls.append(([p.data.decode() for p in parts], complete))
        return assembled_id(parts)


async def test_handover_refused_keeps_parts_and_retries(tmp_path: Path) -> None:
    clock = FixedClock()
    handover = Recorder()
    asm = Assembler(tmp_path, 60, clock, handover, retry_s=5)
    handover.fail = True
    for seq, text in ((2, "b"), (1, "a"), (3, "c")):
        assert (await asm.add(part(seq, text, f"id{seq}"))).stored
    assert asm.pending == 3 and handover.calls == []
    assert len(list(tmp_path.glob("*.part"))) == 3
    handover.fail = False
    assert await asm.sweep() == 0  # not before retry_s
    clock.advance(5)
    assert await asm.sweep() == 1
    assert handover.calls == [(["a", "b", "c"], True)]
    assert list(tmp_path.glob("*.part")) == []
    assert not (await asm.add(part(2, "b", "id2"))).stored  # a late retry of a part


async def test_reload_after_restart(tmp_path: Path) -> None:
    clock = FixedClock()
    first = Assembler(tmp_path, 60, clock, Recorder())
    await first.add(part(1, "a", "id1"))
    await first.add(part(3, "c", "id3"))
    handover = Recorder()
    second = Assembler(tmp_path, 60, clock, handover)
    assert second.load() == 2
    added = await second.add(part(2, "b", "id2"))
    assert added.handed_over == assembled_id(
        [part(1, "a", "id1"), part(2, "b", "id2"), part(3, "c", "id3")])
    assert handover.calls == [(["a", "b", "c"], True)]


async def test_reference_reused_by_a_new_message(tmp_path: Path) -> None:
    handover = Recorder()
    asm = Assembler(tmp_path, 60, FixedClock(), handover)
    await asm.add(part(1, "old1", "o1"))
    await asm.add(part(1, "new1", "n1"))  # same ref and part number, another message id
    assert handover.calls == [(["old1"], False)]
    await asm.add(part(2, "new2", "n2"))
    await asm.add(part(3, "new3", "n3"))
    assert handover.calls[-1] == (["new1", "new2", "new3"], True)


async def test_corrupt_part_file_is_quarantined(tmp_path: Path) -> None:
    (tmp_path / "broken-001.part").write_bytes(b"{not json")
    asm = Assembler(tmp_path, 60, FixedClock(), Recorder())
    assert asm.load() == 0
    assert (tmp_path / "broken-001.bad").exists()


async def test_reused_reference_during_a_slow_handover(tmp_path: Path) -> None:
    import asyncio

    release = asyncio.Event()
    started = asyncio.Event()
    handed: list[list[str]] = []

    async def slow(parts: list[Part], complete: bool) -> None:
        started.set()
        await release.wait()
        handed.append([p.external_id for p in parts])

    asm = Assembler(tmp_path, 60, FixedClock(), slow)
    await asm.add(part(1, "a", "o1", total=2))
    first = asyncio.create_task(asm.add(part(2, "b", "o2", total=2)))  # completes, hands over
    await started.wait()
    await asm.add(part(1, "x", "n1", total=2))  # a new message reusing the reference
    release.set()
    await first
    assert handed == [["o1", "o2"]]
    assert asm.pending == 1  # the new message's first part is still held


async def test_shared_parts_are_kept_until_a_hand_over_succeeds_anywhere(
    tmp_path: Path, redis_client: Any, prefix: str
) -> None:
    """Two instances' assemblers on one Redis: a refused hand-over leaves the parts in shared
    state (no files), the other instance's sweeper hands them over, a late retry of a part at
    either one is a duplicate, and a part that never comes is handed over incomplete."""
    clock = FixedClock()
    refusing, taking = Recorder(), Recorder()
    refusing.fail = True
    state = SharedState(redis_client, Keys(prefix), "kannel")
    one = Assembler(tmp_path / "one", 60, clock, refusing, retry_s=5, state=state)
    two = Assembler(tmp_path / "two", 60, clock, taking, retry_s=5, state=state)
    assert (await one.add(part(1, "a", "id1"))).stored
    assert (await two.add(part(2, "b", "id2"))).stored
    assert (await one.add(part(3, "c", "id3"))).handed_over is None  # refused
    assert await one.held() == await two.held() == 3
    assert one.pending == two.pending == 0 and not list(tmp_path.glob("*/*.part"))
    assert await two.sweep() == 1
    assert taking.calls == [(["a", "b", "c"], True)]
    assert await one.held() == 0
    assert not (await one.add(part(2, "b", "id2"))).stored
    assert not (await two.add(part(3, "c", "id3"))).stored
    assert (await two.add(part(1, "x", "next1", total=2))).stored
    assert await one.sweep() == 0
    clock.advance(61)
    refusing.fail = False
    assert await one.sweep() == 1
    assert refusing.calls == [(["x"], False)]


async def test_a_retried_part_is_a_duplicate_when_another_instance_hands_its_message_over(
    tmp_path: Path, redis_client: Any, prefix: str
) -> None:
    """A provider retries part 1 at instance two, which reads "not handed over"; instance one
    then gets part 2, hands the message over and removes its parts; two must not store part 1
    again: held alone, it went out once more after the timeout as an incomplete message (a
    second contact). Two's first read is held until one has finished, on a real Redis."""
    clock = FixedClock()
    handover = Recorder()
    keys = Keys(prefix)
    two_read, one_done = asyncio.Event(), asyncio.Event()

    class ReadsLate(SharedState):
        """Two's view: its first read of a part's done mark returns after one has finished."""

        stalled = False

        async def get(self, key: str) -> bytes | None:
            value = await super().get(key)
            if key.startswith("done:") and not self.stalled:
                self.stalled = True
                two_read.set()
                await one_done.wait()
            return value

    one = Assembler(tmp_path / "one", 60, clock, handover,
                    state=SharedState(redis_client, keys, "kannel"))
    two = Assembler(tmp_path / "two", 60, clock, handover,
                    state=ReadsLate(redis_client, keys, "kannel"))
    assert (await one.add(part(1, "a", "id1", total=2))).stored
    retry = asyncio.create_task(two.add(part(1, "a", "id1", total=2)))
    await two_read.wait()
    assert (await one.add(part(2, "b", "id2", total=2))).handed_over is not None
    one_done.set()
    assert not (await retry).stored
    assert await one.held() == await two.held() == 0
    clock.advance(61)
    assert await one.sweep() == await two.sweep() == 0
    assert handover.calls == [(["a", "b"], True)]


async def test_shared_parts_are_named_by_a_pseudonym_and_old_names_still_join(
    tmp_path: Path, redis_client: Any, prefix: str
) -> None:
    """The parts' hash was named by the group, ``+8613800138000|12345|5|3``: a full number in a
    key name. It is named by the group's pseudonym; parts held under the old name when the
    gateway was upgraded join the new ones and are cleared with them."""
    keys = Keys(prefix)
    state = SharedState(redis_client, keys, "kannel")
    recorder = Recorder()
    asm = Assembler(tmp_path / "one", 60, FixedClock(), recorder, state=state)
    assert (await asm.add(part(1, "a", "id1"))).stored
    names = [k.decode() for k in await redis_client.keys(f"{keys.tag}:*")]
    assert any(":parts:p" in k for k in names)
    assert [k for k in names if "13800138000" in k] == []

    group = "+8613800138000|12345|6|2"  # another message, held before the upgrade
    old = dataclasses.replace(part(1, "x", "old1", total=2), group=group)
    await state.hash_add(f"parts:{group}", "1", old.to_json(), 600)
    await state.hash_add("open", group, b"1", 600)
    added = await asm.add(dataclasses.replace(part(2, "y", "new2", total=2), group=group))
    assert recorder.calls[-1] == (["x", "y"], True) and added.handed_over is not None
    assert await redis_client.exists(keys.state("kannel", f"parts:{group}")) == 0
    assert await asm.held() == 1  # the first message's part, still waiting


async def test_workers_of_one_data_folder_never_share_part_files(tmp_path: Path) -> None:
    """Two workers of `serve --workers 2` while Redis is away: a worker (re)started beside a
    live one reloaded that one's part files too, and both handed the message over (twice, and
    the second time without the part that came later)."""
    clock = FixedClock()
    base = tmp_path / "sms" / "kannel" / "parts"
    one_took, two_took = Recorder(), Recorder()
    one = Assembler(base, 60, clock, one_took)
    one.load()
    await one.add(part(1, "a", "id1"))
    await one.add(part(2, "b", "id2"))
    two = Assembler(base, 60, clock, two_took)  # a worker started again while `one` serves
    assert two.load() == 0
    assert two.directory != one.directory
    await one.add(part(3, "c", "id3"))
    clock.advance(61)
    await one.sweep()
    await two.sweep()
    assert (one_took.calls, two_took.calls) == ([(["a", "b", "c"], True)], [])
    # workers that die leave their folders; the next one to start takes every part over
    await two.add(part(1, "x", "n1", total=2))
    await one.add(part(1, "y", "m1", total=2, at=1))
    await two.stop()  # as at their death: the lock goes with the process
    await one.stop()
    three = Assembler(base, 60, clock, Recorder())
    assert three.load() == 2
    assert three.directory == base and not list(two.directory.glob("*.part"))
    await three.stop()
