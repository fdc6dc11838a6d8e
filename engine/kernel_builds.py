"""How many Triton kernels this process has built (or loaded from Triton's disk cache), and the time
it took: a kernel meets a new launch shape mid-serving as a step that stalls for about a second.

Triton calls knobs.runtime.jit_cache_hook just before it builds a kernel variant it has not yet
built in this process and jit_post_compile_hook just after; both are chained here, so hooks set by
others keep working. Under TRITON_INTERPRET (CPU) nothing is built and the tally stays at zero.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class KernelBuilds:
    count: int = 0
    seconds: float = 0.0
    names: list[str] = field(default_factory=list)  # kernel function names, in build order
    details: list[str] = field(default_factory=list)  # each build's signature and specialisation key
    _started: dict[str, float] = field(default_factory=dict)  # build key -> perf_counter at its start

    def before(self, key: str) -> None:
        self._started[key] = time.perf_counter()

    def after(self, key: str, signature: str) -> None:
        started = self._started.pop(key, None)
        self.count += 1
        self.seconds += 0.0 if started is None else time.perf_counter() - started
        self.names.append(signature.split("[", 1)[0])
        self.details.append(f"{signature} key={key}")


_builds: KernelBuilds | None = None


def kernel_builds() -> KernelBuilds:
    """This process's tally, counting from the first call (which installs the hooks)."""
    global _builds
    if _builds is None:
        _builds = KernelBuilds()
        _install(_builds)
    return _builds


def _install(builds: KernelBuilds) -> None:
    try:
        from triton import knobs
        runtime = knobs.runtime
        runtime.jit_cache_hook, runtime.jit_post_compile_hook  # noqa: B018 (older Triton lacks them)
    except (ImportError, AttributeError):
        return
    before_others, after_others = runtime.jit_cache_hook, runtime.jit_post_compile_hook

    def before(**kwargs):
        builds.before(str(kwargs.get("key")))
        # A cache hook that returns True tells Triton to skip the build: only another hook may say so.
        return before_others(**kwargs) if before_others is not None else None

    def after(**kwargs):
        builds.after(str(kwargs.get("key")), str(kwargs.get("repr", "?")))
        return after_others(**kwargs) if after_others is not None else None

    runtime.jit_cache_hook, runtime.jit_post_compile_hook = before, after
