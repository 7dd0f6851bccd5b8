"""What the ahead-of-time check fails on, and why these numbers.

Shared memory: the most one thread block may have on the target (opt-in maximum, per the CUDA
programming guide's table of compute capabilities): 227 KB on sm_90 (H100/H200), 163 KB on
sm_80 (A100). Triton allocates it dynamically at launch; over the limit, the launch fails with
"out of resources", so this is a hard error.

Spills: a spilled register goes to local memory, which lives in L1/L2 and DRAM. A few hundred
bytes per thread is a few dozen extra cached loads and stores per element the thread owns; the
memory-bound kernels here hide that behind their global traffic. Beyond SPILL_LIMIT the spill
traffic is of the order of a kernel's own tile per thread (a 64x64 fp32 tile over 128 threads is
128 B per thread; 512 B is 4x that), which a kernel that streams x once cannot hide: the fp32
nonlocal_attn forward at C = 1024 spilled 3.9-15 KB per thread before its block shapes were
chosen by the head dimension. So: spill stores over SPILL_LIMIT bytes per thread fail the check;
smaller spills are reported in the table, not failed.
"""
SHARED_LIMIT_BYTES = {90: 227 * 1024, 80: 163 * 1024}
SPILL_LIMIT_BYTES = 512
