"""CPU emulation of Metal compute kernels: metal_emu.h (the Metal built-ins on C++ threads) and
emulate.py (a drop-in for mx.fast.metal_kernel that compiles and runs them)."""
