"""Online half of oodguard: FastAPI + onnxruntime. Never imports torch (nor oodguard.training)."""
