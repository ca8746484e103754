"""Run every benchmark in turn (``make bench``); each prints its own table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
ORDER = ("intake_bench", "voice_bench", "email_bench", "sms_bench", "chat_bench", "api_bench")


def main() -> int:
    failed = 0
    for name in ORDER:
        if not (HERE / f"{name}.py").exists():
            continue
        print(f"\n=== {name} ===", flush=True)
        failed |= subprocess.call([sys.executable, "-m", f"bench.{name}", *sys.argv[1:]])
    return failed


if __name__ == "__main__":
    sys.exit(main())
