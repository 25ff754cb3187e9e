"""oodguard: an inference-time out-of-distribution guard for image classifiers.

`oodguard.training` (torch, offline) hardens and packages a model; `oodguard.service`
(onnxruntime, online, never torch) serves the resulting bundle.
"""

__version__ = "0.1.0"
