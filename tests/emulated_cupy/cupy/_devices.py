"""The emulated GPUs: how many (MINICVT_EMULATED_DEVICES, default 1) and which one is current,
per thread as in CUDA. `runtime.getDeviceCount()`, `getDevice()`, `setDevice()` and
`cupy.cuda.Device` answer from here; using a device past the count fails as CUDA does."""
import os
import threading


class CUDARuntimeError(RuntimeError):
    """cupy.cuda.runtime.CUDARuntimeError: a CUDA runtime call failed with `status`."""
    _MESSAGES = {100: "cudaErrorNoDevice: no CUDA-capable device is detected",
                 101: "cudaErrorInvalidDevice: invalid device ordinal"}

    def __init__(self, status):
        self.status = status
        super().__init__(self._MESSAGES.get(status, f"CUDA error {status}"))


_current = threading.local()        # .id: this thread's current device; .stack: Device's `with`


def device_count():
    """runtime.getDeviceCount(): MINICVT_EMULATED_DEVICES (default 1), read at every call so
    that a test, or an mpiexec's ranks, can set it."""
    value = os.environ.get("MINICVT_EMULATED_DEVICES", "1")
    if not value.isdigit():
        raise ValueError(f"MINICVT_EMULATED_DEVICES={value!r}: give the number of emulated GPUs")
    if int(value) == 0:
        raise CUDARuntimeError(100)
    return int(value)


def get_device():
    """runtime.getDevice(): this thread's current device."""
    return getattr(_current, "id", 0)


def set_device(device):
    """runtime.setDevice(device): refused, as by CUDA, for a device that does not exist."""
    if not 0 <= device < device_count():
        raise CUDARuntimeError(101)
    _current.id = device


class Device:
    """cupy.cuda.Device: `Device()` is the current device; `use()` and `with` make one current
    (and fail for one that does not exist). Emulated arrays do not remember the device they
    were made on: their `.device` is the current one."""
    compute_capability = "90"

    def __init__(self, device=None):
        self.id = get_device() if device is None else int(device)

    def use(self):
        set_device(self.id)
        return self

    def synchronize(self):
        previous = get_device()
        set_device(self.id)
        set_device(previous)

    def __enter__(self):
        _current.stack = getattr(_current, "stack", []) + [get_device()]
        set_device(self.id)
        return self

    def __exit__(self, *exc):
        set_device(_current.stack.pop())
        return False

    def __int__(self):
        return self.id

    def __eq__(self, other):
        return isinstance(other, Device) and self.id == other.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"<CUDA Device {self.id} (emulated)>"
