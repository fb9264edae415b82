"""The ahead-of-time report run of tests/test_aot.py, started in the background.

``python -m fastformers.gpu_report`` compiles every kernel spec for sm_80 and
sm_90 (about 15 CPU-minutes on a cold Triton cache). conftest.py starts it as
soon as pytest has collected test_aot.py's tests and moves those tests to the
end of the run, so that the compiling overlaps the rest of the suite; the
``report`` fixture then only waits for it. The subprocess runs without
TRITON_INTERPRET, under which Triton cannot compile kernels.
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ARCHS = (80, 90)
# The op families whose SASS the gates of test_aot.py read (issue #18: 16-bit
# products on Hopper's wgmma, no atomics); only these are disassembled (a third
# of a second per compilation, most of a warm run); every kernel still gets its
# registers, shared memory and spills.
TENSOR_CORE_FAMILIES = ("fastformers.ops.xl.", "fastformers.ops.switch.")
# A cold compile of every spec (about 1050 compilations) took 11.5 minutes on 2
# cores at load ~3 (15 CPU minutes); on reruns Triton's cache skips them.
TIMEOUT_S = 1800

STASH_KEY = pytest.StashKey()


def environment(interpret: bool = False) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


class BackgroundReport:
    """One full report run in a subprocess: ``result()`` waits for it."""

    def __init__(self):
        self._directory = tempfile.TemporaryDirectory(prefix="fastformers-aot-report-")
        directory = Path(self._directory.name)
        self.json_path = directory / "report.json"
        # Files, not pipes: a pipe nobody reads until the end would stall the
        # report once its table filled the pipe's buffer.
        self._stdout, self._stderr = open(directory / "stdout", "w+"), open(directory / "stderr", "w+")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "fastformers.gpu_report", "--json", str(self.json_path),
             "--arch", *map(str, ARCHS), "--sass", *TENSOR_CORE_FAMILIES],
            env=environment(), stdout=self._stdout, stderr=self._stderr, text=True,
        )  # fmt: skip

    def result(self) -> subprocess.CompletedProcess:
        returncode = self._process.wait(timeout=TIMEOUT_S)
        outputs = []
        for stream in (self._stdout, self._stderr):
            stream.seek(0)
            outputs.append(stream.read())
        return subprocess.CompletedProcess(self._process.args, returncode, *outputs)

    def stop(self):
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._stdout.close()
        self._stderr.close()
        self._directory.cleanup()
