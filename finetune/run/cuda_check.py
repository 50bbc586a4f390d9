"""Lightning's NVML-based CUDA check, dropped where this machine has no NVML to ask.

Importing Lightning sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` so that ``torch.cuda.is_available()`` asks
NVML instead of initialising CUDA (which would poison forked DataLoader workers). Until CUDA is
initialised torch does not cache that answer, and every optimizer step asks it
(``torch.optim``'s graph-capture check): on a machine without the NVIDIA driver each call tries to
``dlopen`` libnvidia-ml, fails, and falls back to the CUDA runtime's device count anyway. That costs
~35-52 us a call, about a seventh of a cached head's step on a CPU, and buys nothing: without NVML both paths end
in the same runtime call. Where the library loads, the variable stays as Lightning set it.
"""

from __future__ import annotations

import ctypes
import os

NVML_CHECK_VARIABLE = "PYTORCH_NVML_BASED_CUDA_CHECK"
NVML_LIBRARY = "libnvidia-ml.so.1"  # the name torch.cuda loads


def nvml_loads() -> bool:
    try:
        ctypes.CDLL(NVML_LIBRARY)
    except OSError:
        return False
    return True


def drop_nvml_check_without_nvml() -> bool:
    """Unset the NVML-based check when NVML cannot be loaded here; True when it was unset."""
    if os.environ.get(NVML_CHECK_VARIABLE) != "1" or nvml_loads():
        return False
    del os.environ[NVML_CHECK_VARIABLE]
    return True
