"""Real runtimes an exported model runs in (one file each): ``onnxruntime``, ``openvino``, ``tvm``, PyTorch's int8
engines ``torch-x86`` and ``torch-qnnpack``, ``executorch`` (XNNPACK delegate) and ``tensorrt`` (GPU only)."""

from quantbench.deploy.runtimes import (  # noqa: F401  (register)
    executorch,
    onnxruntime,
    openvino,
    tensorrt,
    torch_int8,
    tvm,
)
from quantbench.deploy.runtimes.base import (
    DEPLOY_RUNTIMES,
    Loaded,
    OpReport,
    Runtime,
    RuntimeOptions,
    get_runtime,
    register_runtime,
)

__all__ = ["DEPLOY_RUNTIMES", "Loaded", "OpReport", "Runtime", "RuntimeOptions", "get_runtime", "register_runtime"]
