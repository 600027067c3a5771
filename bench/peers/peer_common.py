"""What the peer scripts of bench/peers/ share (imported from beside them: `python3 bench/peers/<peer>.py` puts this
folder first on sys.path)."""
import argparse
import os
import statistics
import subprocess


def git_rev():
    """The moerl revision a peer's results stand beside: MOERL_REV (the binaries' revision, set by
    scripts/device-run.sh, whose tree copy may carry a stale .git), else the checkout's, else "unknown"."""
    if os.environ.get("MOERL_REV"):
        return os.environ["MOERL_REV"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def timing_args(doc, steps, warmup):
    """The command line of a timing peer (its docstring as --help): --steps (timed, median reported) and --warmup
    (untimed, first)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=steps, help="timed passes (median reported)")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed passes first")
    return parser.parse_args()


def median_ms(fn, steps, warmup):
    """The median of `steps` CUDA-event-timed calls of fn() (milliseconds), after `warmup` untimed ones."""
    import torch  # here: not every peer needs it at import time

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
