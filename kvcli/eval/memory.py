"""Memory of a prefill mode, measured in a child process that loads only what the mode needs.

One process holding both models would charge the auxiliary to the base alone, so each mode
is measured by ``python -m kvcli.eval.memory MODE ...`` in its own process: base and truncate
load the base only; kvp and select load the base, the auxiliary and the predictor. After each prompt
length it reports the peak RSS (VmHWM, reset between lengths through /proc/self/clear_refs),
the peak PSS (/proc/self/smaps_rollup sampled every few milliseconds during the prefill by a
thread: shared pages split between the mappings and processes that map them, so a file
mapped twice counts once) and the PSS right after the prefill.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path


def _status_kib(field: str, path: str = "/proc/self/status") -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mib() -> float | None:
    kib = _status_kib("VmHWM")
    return None if kib is None else round(kib / 1024, 1)


def pss_mib() -> float | None:
    kib = _status_kib("Pss", "/proc/self/smaps_rollup")
    return None if kib is None else round(kib / 1024, 1)


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


class PssSampler:
    """The largest PSS seen while the ``with`` block runs, sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak = interval, 0.0
        self._stop = threading.Event()

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, pss_mib() or 0.0)
            if self._stop.wait(self.interval):
                return

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, pss_mib() or 0.0)


def measure_in_child(
    mode: str,
    bundle: Path,
    lengths: list[int],
    prompts: dict[int, list[int]],
    settings: dict,
    tail: int = 0,
    keep: dict[int, int] | None = None,
    aux_load: str = "auto",
    spans: int = 0,
) -> dict[int, dict]:
    """Per prompt length: {peak_rss_mib, peak_pss_mib, pss_mib} of ``mode`` in a fresh process."""
    job = {
        "mode": mode,
        "bundle": str(bundle),
        "lengths": lengths,
        "settings": settings,
        "prompts": {str(n): prompts[n] for n in lengths},
        "tail": tail,
        "aux_load": aux_load,
        "spans": spans,
        "keep": {str(n): k for n, k in (keep or {}).items()},
    }
    res = subprocess.run(
        [sys.executable, "-m", "kvcli.eval.memory"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if res.returncode != 0:
        tail_line = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory probe for {mode} failed: {tail_line}")
    return {int(n): v for n, v in json.loads(res.stdout).items()}


def _child() -> None:
    from kvcli.engine.bundle import load_bundle
    from kvcli.engine.engine import Engine
    from kvcli.engine.prefill_types import KvpSettings
    from kvcli.llama.runtime import ContextSettings

    job = json.loads(sys.stdin.read())
    b = load_bundle(job["bundle"])
    settings = ContextSettings(**job["settings"])
    with_aux = job["mode"] in ("kvp", "select", "aux")
    out = {}
    with Engine.from_bundle(
        b,
        with_aux=with_aux,
        with_predictor=job["mode"] in ("kvp", "select"),  # select ranks by predicted keys
        settings=settings,
        aux_load=job["aux_load"] if with_aux else "auto",
    ) as engine:
        for n in job["lengths"]:
            reset_peak()
            with PssSampler() as sampler:
                engine.prefill(
                    job["prompts"][str(n)],
                    mode=job["mode"],
                    kvp=KvpSettings(tail=job["tail"], spans=job["spans"]),
                    keep=job["keep"].get(str(n)),
                )
            out[n] = {
                "peak_rss_mib": peak_rss_mib(),
                "peak_pss_mib": round(sampler.peak, 1),
                "pss_mib": pss_mib(),
            }
    print(json.dumps(out))


if __name__ == "__main__":
    _child()
