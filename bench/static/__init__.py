"""The static kernel report: every kernel the launchers launch on the benchmark shapes, compiled on
the CPU for sm_80/86/89/90 exactly as Triton's JIT would build it at run time, and read from the
compiler's output (registers, spills, shared memory, occupancy, the hot loop's SASS), with a
documented model that turns this into estimated times: ``python -m bench.static``.

- ``launches``: what the launchers launch, captured, and specialized by Triton's own JIT binder.
- ``build``: compile (cached on disk) and read the cubin and its SASS.
- ``sass``: the SASS reader (loops, instruction mix, MMA kind, flops and bytes per iteration).
- ``model``: device constants and the roofline + instruction-issue model (estimates, not timings).
- ``gates``: the limits the test suite holds every launched kernel to.
"""
