"""A fake accelerator for tests: tensors "on" it compute on the CPU but are tracked, and mixing
them with CPU tensors fails as it would on a GPU.

``FAKE`` (torch's ``privateuseone`` device type, which no code branches on and on which
nothing can be allocated for real) is what ``runtime.worker_device()`` returns in a test.
Under :class:`FakeDevice` (a ``TorchFunctionMode``, so it sees every torch call made from
Python in this thread):

* ``.to(FAKE)``, ``Module.to(FAKE)`` and factories given ``device=FAKE`` make CPU tensors
  (copies, as a real move makes) and mark their storage as being on the fake device;
  whatever a torch call computes from a marked tensor is marked too, ``.grad`` of a
  marked parameter as well. ``.device`` of a marked tensor is ``FAKE``.
* A call mixing marked tensors with CPU tensors (other than 0-dim ones, which CUDA
  accepts as scalars) raises ``RuntimeError("Expected all tensors to be on the same
  device ...")``; ``.numpy()`` of a marked tensor raises as it would for a CUDA tensor.
  So a tensor a stage forgot to move is caught where a GPU would catch it, on any machine.
* ``.cpu()`` / ``.to("cpu")`` of a marked tensor return an unmarked copy.

Every ``nn.Module`` forward is recorded (:attr:`FakeDevice.forwards`: the module's class,
the devices of its own parameters and buffers and of its tensor inputs), so a test can
assert that the models ran on the fake device rather than quietly on the CPU.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

FAKE = "privateuseone"
_FAKE_TYPE = torch.device(FAKE).type

# Calls that legitimately take tensors of several devices (a copy between them, or CPU indices).
_CROSS_DEVICE = {"copy_", "__getitem__", "__setitem__", "__set__", "to", "cpu", "_has_compatible_shallow_copy_type"}


# What is on the fake device, shared by every FakeDevice: a model a worker cache kept from an
# earlier test is still on it. Storages by address (weakly: a freed address is forgotten)...
_STORAGES: weakref.WeakValueDictionary[int, torch.UntypedStorage] = weakref.WeakValueDictionary()
# ... and tensors without bytes, which have no storage to tell apart, by identity (a WeakSet would
# compare tensors with ==, which is elementwise).
_EMPTY: dict[int, weakref.ref] = {}


@dataclass(frozen=True)
class Forward:
    module: str
    weights: frozenset[str]  # devices of the module's own parameters and buffers
    inputs: frozenset[str]  # devices of the tensors passed to forward


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def _is_property(func, name: str, attribute: str) -> bool:
    return name in ("__get__", "__set__") and getattr(func, "__self__", None) is getattr(torch.Tensor, attribute)


class FakeDevice(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self._storages = _STORAGES
        self._empty = _EMPTY
        self.forwards: list[Forward] = []
        self._hook = None

    # ------------------------------------------------------------------ marking

    def is_fake(self, tensor: torch.Tensor) -> bool:
        ref = self._empty.get(id(tensor))
        if ref is not None and ref() is tensor:
            return True
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return False
        return storage.nbytes() > 0 and self._storages.get(storage.data_ptr()) is storage

    def _mark(self, value) -> None:
        for tensor in _tensors(value):
            if tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            if storage.nbytes() > 0:
                self._storages[storage.data_ptr()] = storage
            else:
                self._empty[id(tensor)] = weakref.ref(tensor)

    def _device_of(self, tensor: torch.Tensor) -> str:
        return FAKE if self.is_fake(tensor) else str(tensor.device)

    # ------------------------------------------------------------------ the mode

    def __enter__(self):
        self._hook = torch.nn.modules.module.register_module_forward_pre_hook(self._record)
        return super().__enter__()

    def __exit__(self, *exc):
        self._hook.remove()
        return super().__exit__(*exc)

    def _record(self, module: torch.nn.Module, args) -> None:
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        self.forwards.append(Forward(type(module).__name__, frozenset(str(t.device) for t in own),
                                     frozenset(str(t.device) for t in _tensors(args))))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if _is_property(func, name, "device") and name == "__get__":
            return torch.device(FAKE) if self.is_fake(args[0]) else func(*args, **kwargs)
        if _is_property(func, name, "grad") and name == "__get__":
            grad = func(*args, **kwargs)
            if grad is not None and self.is_fake(args[0]):
                self._mark(grad)  # autograd made it on the parameter's device
            return grad
        if name in ("numpy", "__array__") and self.is_fake(args[0]):
            raise TypeError(f"can't convert {FAKE} device type tensor to numpy. Use Tensor.cpu() to copy the "
                            "tensor to host memory first.")
        if name == "_parse_to":  # Module.to asks where to: the fake device itself, not its stand-in
            return func(*args, **kwargs)
        if name == "to" and isinstance(args[0], torch.Tensor):
            return self._to(func, args, kwargs)
        if name == "cpu" and isinstance(args[0], torch.Tensor) and self.is_fake(args[0]):
            return args[0].to("cpu", copy=True)
        if name == "cuda":
            raise RuntimeError("a stage called .cuda(): it must move tensors to runtime.worker_device()")

        device = kwargs.get("device")
        target = None if device is None else torch.device(device)
        if target is not None and target.type == _FAKE_TYPE:
            kwargs["device"] = "cpu"
        inputs = _tensors(args) + _tensors(kwargs)
        fake = [t for t in inputs if self.is_fake(t)]
        if fake and name not in _CROSS_DEVICE:
            cpu = [t for t in inputs if t.device.type == "cpu" and t.dim() > 0 and not self.is_fake(t)]
            if cpu:
                raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                                   f"{FAKE} and cpu! (when calling {name or func})")
        if name == "__getitem__" and not self.is_fake(args[0]) and fake:
            raise RuntimeError(f"indices should be either on cpu or on the same device as the indexed tensor ({FAKE})")
        result = func(*args, **kwargs)
        on_fake = (target.type == _FAKE_TYPE) if target is not None else bool(fake)
        if on_fake and name not in ("__setitem__", "__set__", "copy_"):
            self._mark(result)
        return result

    def _to(self, func, args, kwargs):
        tensor, rest = args[0], args[1:]
        if rest and isinstance(rest[0], torch.Tensor):  # .to(other): other's device and dtype
            other = rest[0]
            device, dtype = (torch.device(FAKE) if self.is_fake(other) else other.device), other.dtype
            non_blocking = kwargs.get("non_blocking", False)
        else:
            device, dtype, non_blocking, _ = torch._C._nn._parse_to(*rest, **kwargs)
        if device is None:
            result = func(*args, **kwargs)
            if self.is_fake(tensor):
                self._mark(result)
            return result
        dtype = dtype or tensor.dtype
        if device.type == _FAKE_TYPE:
            result = tensor.to("cpu", dtype, non_blocking=non_blocking, copy=not self.is_fake(tensor))
            self._mark(result)
            return result
        if device.type == "cpu" and self.is_fake(tensor):
            return tensor.to("cpu", dtype, non_blocking=non_blocking, copy=True)
        return func(*args, **kwargs)
