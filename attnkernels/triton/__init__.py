"""Triton kernels, one module per hot path (`channel_gate`, ...).

Each module registers its ops with `torch.library.triton_op` under the namespace
`attnkernels_triton` when it is imported, with the schemas of csrc/<hot_path>_ops.cpp, and
then their autograd and the hot path's composite ops (`attnkernels.ops.register_hot_path`);
nothing is imported here, so importing `attnkernels.triton` never pulls in Triton. On a
machine without a GPU, set `TRITON_INTERPRET=1` before importing a kernel module to run it on
CPU tensors.
"""
