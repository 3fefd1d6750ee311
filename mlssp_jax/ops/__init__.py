"""CPU kernels below the model's layers: the convolution dispatch (:mod:`.conv_ops`: XLA,
2-D formulations or oneDNN), the oneDNN FFI handlers (:mod:`.onednn`, C++ in ``csrc/``) and
the CPU process environment (:mod:`.cpu_env`, applied by the commands, never at import)."""
