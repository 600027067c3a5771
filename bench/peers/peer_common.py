"""What the peer scripts of bench/peers/ share (imported from beside them: `python3 bench/peers/<peer>.py` puts this
folder first on sys.path)."""
import os
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
