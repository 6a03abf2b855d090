"""Running the ``normswap`` command line in tests: in this process (``cli.main``) where a new interpreter
adds nothing, or as the real console script in a subprocess (one test per subcommand does that)."""

from __future__ import annotations

import shutil
import subprocess
import sys

from normswap import cli

EXE = shutil.which("normswap")


def console(*args: str, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    """The installed console script (``python -m normswap.cli`` where it is not installed)."""
    cmd = [EXE, *args] if EXE else [sys.executable, "-m", "normswap.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def in_process(capfd, *args: str) -> subprocess.CompletedProcess:
    """``cli.main(args)`` here, with what it writes to file descriptors 1 and 2 (transformers' own logging
    and progress bars included) captured by pytest's ``capfd``; same fields as :func:`console`."""
    capfd.readouterr()
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exc:  # argparse: --help, bad usage
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)
