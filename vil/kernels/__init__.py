"""Fused GPU kernels. Triton is imported on first use, so ``import vil`` works without it."""

__all__ = ["mlstm_chunkwise_triton", "mlstm_parallel_triton"]


def __getattr__(name: str):
    if name == "mlstm_chunkwise_triton":
        from vil.kernels.mlstm_triton import mlstm_chunkwise_triton

        return mlstm_chunkwise_triton
    if name == "mlstm_parallel_triton":
        from vil.kernels.mlstm_parallel_triton import mlstm_parallel_triton

        return mlstm_parallel_triton
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
