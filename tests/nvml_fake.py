"""The fake NVML library (``tests/fake_nvml/fake_nvml.c``) from Python.

``build`` compiles it with the system C compiler; ``FakeNvml`` loads the built file with
ctypes — the same loaded library meterage opens through ``METERAGE_NVML_LIBRARY``, so the
scripted devices, counters and injected errors are what meterage reads.
"""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

from servers import require_binary

SOURCE = Path(__file__).parent / "fake_nvml" / "fake_nvml.c"
ALL_DEVICES = 0xFFFFFFFF
#: NVML return codes the tests inject.
NOT_SUPPORTED = 3
NO_PERMISSION = 4
DRIVER_NOT_LOADED = 9
GPU_IS_LOST = 15
#: Memory the fake's driver keeps for itself: in "used" of nvmlDeviceGetMemoryInfo (v1), not
#: of nvmlDeviceGetMemoryInfo_v2.
RESERVED_BYTES = 256 << 20
#: ``usedGpuMemory`` when the driver does not say (NVML_VALUE_NOT_AVAILABLE).
VALUE_NOT_AVAILABLE = 2**64 - 1


FLAGS = ("-shared", "-fPIC", "-O1", "-Wall", "-Werror")


def build(directory: Path, *, r535: bool = False) -> str:
    """Compiles the fake into ``directory``; returns the library's path. ``r535``: the
    layout of drivers 535.43-535.86, whose ``_v3`` process entries are 32 bytes."""
    compiler = require_binary("cc", fallbacks=["/usr/bin/gcc"], hint="apt-get install gcc")
    library = directory / ("libfake_nvml_r535.so" if r535 else "libfake_nvml.so")
    defines = ["-DFAKE_NVML_R535"] if r535 else []
    subprocess.run(
        [compiler, *FLAGS, *defines, "-o", str(library), str(SOURCE), "-lpthread"],
        check=True,
        capture_output=True,
        text=True,
    )
    return str(library)


class FakeNvml:
    """Scripts the fake's devices; every method checks the fake accepted the change."""

    def __init__(self, path: str) -> None:
        self.path = path
        lib = ctypes.CDLL(path)
        u32, u64, text = ctypes.c_uint, ctypes.c_ulonglong, ctypes.c_char_p
        signatures = {
            "fake_nvml_reset": [],
            "fake_nvml_add_device": [text, text, u64],
            "fake_nvml_add_energy": [u32, u64],
            "fake_nvml_set_power": [u32, u32],
            "fake_nvml_set_memory_used": [u32, u64],
            "fake_nvml_set_utilization": [u32, u32, u32, u32, u32],
            "fake_nvml_set_temperature": [u32, u32],
            "fake_nvml_set_process": [u32, u32, u64],
            "fake_nvml_add_process_sample": [u32, u32, u64, u32, u32, u32, u32],
            "fake_nvml_fail": [text, u32, ctypes.c_int],
            "fake_nvml_calls": [text],
        }
        for name, argtypes in signatures.items():
            getattr(lib, name).argtypes = argtypes
        lib.fake_nvml_reset.restype = None
        lib.fake_nvml_calls.restype = u64
        self._lib = lib

    def _ok(self, result: int) -> None:
        assert result == 0, "the fake NVML refused the change"

    def reset(self) -> None:
        self._lib.fake_nvml_reset()

    def add_device(self, name: str, uuid: str, memory_total: int) -> int:
        index = self._lib.fake_nvml_add_device(name.encode(), uuid.encode(), memory_total)
        assert index >= 0
        return index

    def add_energy(self, device: int, millijoules: int) -> None:
        self._ok(self._lib.fake_nvml_add_energy(device, millijoules))

    def set_power(self, device: int, milliwatts: int) -> None:
        self._ok(self._lib.fake_nvml_set_power(device, milliwatts))

    def set_memory_used(self, device: int, used: int) -> None:
        self._ok(self._lib.fake_nvml_set_memory_used(device, used))

    def set_utilization(
        self, device: int, gpu: int, memory: int, encoder: int = 0, decoder: int = 0
    ) -> None:
        self._ok(self._lib.fake_nvml_set_utilization(device, gpu, memory, encoder, decoder))

    def set_temperature(self, device: int, celsius: int) -> None:
        self._ok(self._lib.fake_nvml_set_temperature(device, celsius))

    def set_process(self, device: int, pid: int, used: int | None) -> None:
        used = VALUE_NOT_AVAILABLE if used is None else used
        self._ok(self._lib.fake_nvml_set_process(device, pid, used))

    def add_process_sample(
        self,
        device: int,
        pid: int,
        time_us: int,
        sm: int,
        memory: int = 0,
        encoder: int = 0,
        decoder: int = 0,
    ) -> None:
        self._ok(
            self._lib.fake_nvml_add_process_sample(
                device, pid, time_us, sm, memory, encoder, decoder
            )
        )

    def fail(self, function: str, code: int, device: int | None = None) -> None:
        """``function`` returns ``code`` (0: works again), for one device or all."""
        target = ALL_DEVICES if device is None else device
        self._ok(self._lib.fake_nvml_fail(function.encode(), target, code))

    def calls(self, function: str) -> int:
        return self._lib.fake_nvml_calls(function.encode())
