"""Cost of the language hint (``gateway/contact/language.py``) per text, against an older
version of it.

    .venv/bin/python -m bench.language_bench --before DIR

DIR is an older source tree (``git archive <commit> gateway | tar -x -C DIR``); its
``gateway/contact/language.py`` (``language.py`` at the top of the package before the tree was
grouped by role) is loaded as a module of its own and timed in the same run, text by text.
Without ``--before`` only the current module is timed.
"""

from __future__ import annotations

import argparse
import importlib.util
import timeit
from collections.abc import Callable
from pathlib import Path

from gateway.contact.language import guess_language

BENCH_TEXT = "您好，我家楼下的路灯已经坏了一个星期，晚上出行很不安全，请尽快派人维修。"
TEXTS = {
    "intake bench text (zh, 108 chars)": BENCH_TEXT * 3,
    "zh SMS (16 chars)": "路灯坏了，请尽快修理。小区东门。",
    "zh, 230 chars": ("路灯坏了，请尽快修理。" * 30)[:230],
    "en SMS (70 chars)": "No water since yesterday in the building at 5 Main Street, please help",
    "ru (110 chars)": "Привет, у нас нет воды уже три дня, пожалуйста помогите" * 2,
    "zh with a Latin word": "我的iPhone坏了，屏幕不亮",
}


def per_call_us(fn: Callable[[str], str | None], text: str, n: int = 5000) -> float:
    return min(timeit.repeat(lambda: fn(text), number=n, repeat=5)) / n * 1e6


def _before_module(tree: Path) -> Path:
    """The language module of an older tree: grouped by role, or flat as it was before."""
    grouped = tree / "gateway" / "contact" / "language.py"
    return grouped if grouped.exists() else tree / "gateway" / "language.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="", help="older source tree")
    args = parser.parse_args()
    old: Callable[[str], str | None] | None = None
    if args.before:
        spec = importlib.util.spec_from_file_location(
            "language_before", _before_module(Path(args.before))
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        old = module.guess_language
    print("| text | before | now | before / now |")
    print("|---|---:|---:|---:|")
    for name, text in TEXTS.items():
        now = per_call_us(guess_language, text)
        if old is None:
            print(f"| {name} | | {now:.1f} µs | |")
            continue
        if old(text) != guess_language(text):
            print(f"  {name}: the hint changed, {old(text)} -> {guess_language(text)}")
        then = per_call_us(old, text)
        print(f"| {name} | {then:.1f} µs | {now:.1f} µs | {then / now:.1f} |")


if __name__ == "__main__":
    main()
