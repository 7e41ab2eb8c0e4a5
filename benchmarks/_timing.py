"""Wall-clock timing shared by the benchmarks."""
import time

import torch


def fastest_times(runs, repeats):
    """Fastest time of each zero-argument callable, run in turn after one warm-up call each (which
    sizes the power iteration, builds the kernels and primes the allocator). This VM's speed drifts
    by 25% and noise only ever adds time, so the minimum is the steadiest estimate of each."""
    for run in runs:
        run()
    times = [[] for _ in runs]
    for _ in range(repeats):
        for run, ts in zip(runs, times):
            t0 = time.perf_counter()
            run()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
    return [min(ts) for ts in times]
