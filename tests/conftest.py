import os

# Triton kernels run on the CPU under the interpreter in CI; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
