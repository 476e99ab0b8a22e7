"""Run megatron-core on CPU with the gloo backend (development machines and CI only).

megatron-core assumes CUDA in a handful of places that have nothing to do with the maths.
`enable_cpu_backend()` routes exactly those to the CPU and is a no-op when CUDA is available,
so GPU runs never touch this module. What it changes, and why:

1. ``torch.cuda.current_device`` returns 0 instead of raising: megatron passes it as a
   ``device=`` argument; item 2 then maps that to the CPU.
2. A ``TorchFunctionMode`` (``_CudaToCpuMode``) is pushed for the main thread: every
   ``device=`` keyword, ``Tensor.to/cuda`` target and positional device that names CUDA
   ("cuda", "cuda:N", ``torch.device("cuda")`` or an int index) becomes ``cpu``; megatron
   allocates e.g. ``torch.zeros(..., device="cuda")`` in its schedules and DDP buffers.
   The same mode answers ``Tensor.type()`` (no arguments) with the CUDA type name for float
   tensors ("torch.cuda.FloatTensor" for a CPU fp32 tensor): megatron's optimizers
   (``Float16OptimizerWithFloat16Params``, ``DistributedOptimizer``) and
   ``clip_grad_by_total_norm_fp32`` dispatch on, or assert, those names.
   torch keeps function modes per thread, so code that runs the model from other threads
   (the servers' request threads) enters ``cpu_backend_thread()`` around it; and autograd
   runs custom Functions' backward with no mode active, so the mode is re-entered there.
3. megatron's CUDA RNG tracker (``megatron.core.tensor_parallel.random``) is replaced by
   ``CpuRNGStatesTracker``, which keeps named *CPU* generator states with the same fork
   semantics (dropout regions, weight init forks).
4. ``torch.cuda.synchronize`` / ``torch.cuda.empty_cache`` / ``torch.cuda.get_rng_state``
   (also as ``torch.cuda.random.get_rng_state``, which recomputation calls) become CPU
   equivalents (no-ops or the CPU RNG state); timers and checkpointing call them.

The default causal mask (``megatron.core.transformer.utils.get_default_causal_mask``)
allocates with ``device="cuda"`` and is covered by item 2. One CPU-only *setting* lives with
the rest of the model config (``model/config.py``): ``batch_p2p_comm=False``, because gloo can
pair a batched send/recv of an activation and a gradient of one shape crosswise under the
interleaved pipeline schedule. Nothing here changes a model,
a parallel layer, a schedule or an optimizer: those are megatron-core's code paths as on GPU.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is how megatron passes torch.cuda.current_device(); bool is not a device.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func in (torch.Tensor.cuda,):
            return args[0]
        if func is torch.Tensor.to:
            args = tuple("cpu" if i > 0 and _is_cuda_device(a) else a for i, a in enumerate(args))
        out = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _CUDA_TYPE_NAMES.get(out, out)
        return out


_CUDA_TYPE_NAMES = {f"torch.{n}Tensor": f"torch.cuda.{n}Tensor" for n in ("Float", "Half", "BFloat16")}


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron's RNG tracker, keeping CPU generator states instead of CUDA ones."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


def enable_cpu_backend() -> bool:
    """Route megatron-core's CUDA assumptions to the CPU. Returns True if it did anything.

    Call before building any megatron object. A no-op (returns False) when CUDA is available.
    """
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True

    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: None
    # megatron's activation recomputation reaches the same functions through the submodule
    # (tensor_parallel/random.py 0.16.1, line 55: `torch.cuda.random.get_rng_state`).
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.random.set_rng_state = torch.cuda.set_rng_state
    torch.cuda.manual_seed = lambda seed: None
    _CudaToCpuMode().__enter__()  # for the whole thread on purpose: megatron allocates everywhere
    # autograd runs a custom Function's backward with no function mode active (the mode stack
    # is empty there), and megatron's sequence-parallel gathers allocate with
    # device=torch.cuda.current_device() in their backward (tensor_parallel/mappings.py 0.16.1,
    # line 141): the mode is re-entered around every custom backward.
    from torch.autograd import function as autograd_function

    backward_apply = autograd_function.BackwardCFunction.apply

    def apply_with_cpu_routing(self, *args):
        with _CudaToCpuMode():
            return backward_apply(self, *args)

    autograd_function.BackwardCFunction.apply = apply_with_cpu_routing

    from megatron.core.tensor_parallel import random as mrandom

    mrandom._CUDA_RNG_STATE_TRACKER = _cpu_rng_tracker_class()()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mrandom.initialize_rng_tracker = lambda *a, **k: None  # keep the CPU tracker
    _ENABLED = True
    return True


def cpu_backend_thread():
    """A context that applies the device routing (item 2) in the calling thread, when the CPU
    backend is enabled and the thread does not have it yet; otherwise it does nothing."""
    from torch.overrides import _get_current_function_mode_stack

    if not _ENABLED or any(isinstance(m, _CudaToCpuMode)
                           for m in _get_current_function_mode_stack()):
        return contextlib.nullcontext()
    return _CudaToCpuMode()
