"""``gateway serve --workers N``'s parent: spool segments no worker would own are moved to one
that will (a one-process run's ``spool/``, ``spool/worker-K`` beyond N, and back), and the
merged ``/metrics`` keeps each family whole with a ``worker`` label per sample; a worker's log
lines say which worker."""

from __future__ import annotations

from pathlib import Path

import orjson
from prometheus_client.parser import text_string_to_metric_families

from gateway.server.lock import DataDirLock
from gateway.server.metrics import Metrics
from gateway.server.workers import adopt_spools, hand_over_spool, merge_metrics, spool_folder


def segment(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"segment-{name}.log"
    path.write_text(text)
    return path


def segments(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.glob("segment-*.log"))}


def test_segments_of_a_one_process_run_and_of_a_larger_pool_go_to_owned_folders(tmp_path):
    root = tmp_path / "spool"
    segment(root, "1", "one-process\n")
    segment(spool_folder(tmp_path, 0), "2", "worker 0\n")
    segment(spool_folder(tmp_path, 3), "2", "worker 3, same name\n")
    segment(spool_folder(tmp_path, 4), "5", "worker 4\n")
    assert adopt_spools(tmp_path, 2) == 3
    assert segments(root) == {}
    assert not list(spool_folder(tmp_path, 3).glob("segment-*"))
    kept = [*segments(spool_folder(tmp_path, 0)).values()]
    kept += segments(spool_folder(tmp_path, 1)).values()
    assert sorted(kept) == sorted(
        ["one-process\n", "worker 0\n", "worker 3, same name\n", "worker 4\n"]
    )
    # and back to one process: every worker's segments into spool/ itself
    assert adopt_spools(tmp_path, 1) == 4
    assert sorted(segments(root).values()) == sorted(kept)


def test_nothing_moves_when_every_folder_is_owned(tmp_path):
    segment(spool_folder(tmp_path, 0), "1", "a\n")
    segment(spool_folder(tmp_path, 1), "1", "b\n")
    assert adopt_spools(tmp_path, 2) == 0
    assert adopt_spools(tmp_path / "none", 2) == 0


def test_a_dead_workers_spool_is_handed_to_a_serving_one_never_a_live_ones(tmp_path):
    segment(spool_folder(tmp_path, 1), "1", "dead worker's\n")
    segment(spool_folder(tmp_path, 0), "1", "serving worker's\n")
    held = DataDirLock(spool_folder(tmp_path, 1))
    held.acquire()  # a process holds worker 1's spool: it is not dead, nothing moves
    try:
        assert hand_over_spool(tmp_path, 1, 0) == 0
    finally:
        held.release()
    assert hand_over_spool(tmp_path, 1, 0) == 1
    assert segments(spool_folder(tmp_path, 1)) == {}
    assert sorted(segments(spool_folder(tmp_path, 0)).values()) == [
        "dead worker's\n", "serving worker's\n"
    ]


def test_merged_metrics_label_every_sample_with_its_worker_and_keep_families_whole():
    texts = {}
    for slot, count in ((0, 3), (1, 5)):
        metrics = Metrics()
        metrics.received.labels("web", "api").inc(count)
        texts[slot] = metrics.render()
    merged = merge_metrics(texts).decode()
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    received = [
        (s.labels["worker"], s.value)
        for s in families["gateway_contacts_received"].samples
        if s.name.endswith("_total")
    ]
    assert sorted(received) == [("0", 3.0), ("1", 5.0)]
    type_lines = [x for x in merged.splitlines() if x.startswith("# TYPE ")]
    assert len(type_lines) == len(set(type_lines))  # one block per family, as the format asks


def test_a_workers_log_lines_say_which_worker(capsys):
    import logging

    from gateway.server.logs import setup_logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        setup_logging("json", "INFO", worker=1)
        logging.getLogger("gateway.test").info("json line")
        setup_logging("plain", "INFO", worker=0)
        logging.getLogger("gateway.test").info("plain line")
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
    json_line, plain_line = capsys.readouterr().err.splitlines()[-2:]
    assert orjson.loads(json_line)["worker"] == "1"
    assert " INFO w0 gateway.test: plain line" in plain_line
