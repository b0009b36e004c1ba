"""Run the entry points under tcmalloc when the machine has it.

XLA:CPU allocates each step's temporaries (the activations the backward pass keeps, ~1 GiB for
bench_cpu) afresh. glibc serves allocations that large with mmap and returns them to the kernel
when freed, so every step pays a page fault for every 4 KiB it touches first; the profile shows
it as zero-filling broadcasts that run at ~1 GB/s. tcmalloc keeps freed memory for reuse: bench_cpu
ran at 1,011 / 925 tokens/s against 851 / 668 with glibc (alternating runs, same sitting).

An allocator has to be loaded before the process starts, so `use_tcmalloc` re-executes the
process with LD_PRELOAD set; it must run before anything else is imported. It does nothing when
tcmalloc is already loaded, not installed (`apt install libtcmalloc-minimal4`), or
LAYERJAX_ALLOCATOR=system is set.
"""

from __future__ import annotations

import os
import sys

# Where Debian/Ubuntu (libtcmalloc-minimal4, google-perftools) and RHEL (gperftools-libs) put it.
TCMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
                  "/usr/lib64/libtcmalloc_minimal.so.4", "/usr/lib/libtcmalloc_minimal.so.4")
OPT_OUT = "LAYERJAX_ALLOCATOR"


def tcmalloc_env(env: dict[str, str], candidates=TCMALLOC_PATHS) -> dict[str, str] | None:
    """The environment to re-execute with, or None to go on as is."""
    if env.get(OPT_OUT, "tcmalloc") == "system" or "tcmalloc" in env.get("LD_PRELOAD", ""):
        return None
    library = next((path for path in candidates if os.path.isfile(path)), None)
    if library is None:
        return None
    preload = " ".join(filter(None, [library, env.get("LD_PRELOAD", "")]))
    # The marker stops a second re-exec should the preload not take (a static Python, say).
    return {**env, "LD_PRELOAD": preload, OPT_OUT: "system"}


def current_allocator() -> str:
    """"tcmalloc" when this process runs with it preloaded, else "system"."""
    return "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "system"


def use_tcmalloc() -> None:
    """Replaces this process (same pid, same arguments) by one with tcmalloc preloaded."""
    env = tcmalloc_env(dict(os.environ))
    if env is not None:
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
