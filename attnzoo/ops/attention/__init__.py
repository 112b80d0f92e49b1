from attnzoo.ops.attention import triton_backend  # noqa: F401
