"""`safejudge serve` as a subprocess, the way a user starts it: wait for its `ready:` line, stop it with SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

READY_TIMEOUT_S = 300


@dataclass
class ServeProcess:
    url: str = ""
    output: list[str] = field(default_factory=list)  # every line printed, start-up and shutdown
    returncode: int | None = None


@contextmanager
def serve_process(command: Sequence[str], cwd: Path, env: Mapping[str, str]) -> Iterator[ServeProcess]:
    """Yields once `serve` printed `ready: gRPC <url> ...`; afterwards returncode and the whole output are set."""
    process = subprocess.Popen(list(command), cwd=cwd, env=dict(env), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    served = ServeProcess()
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line, "serve exited while starting:\n" + "".join(served.output)
            served.output.append(line)
            if line.startswith("ready:"):
                served.url = re.search(r"gRPC (\S+)", line).group(1)
                break
        assert served.url, "serve was not ready in time:\n" + "".join(served.output)
        yield served
    finally:
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=60)
        served.output.append(rest)
        served.returncode = process.returncode
