"""Output directories of train.py and evaluate.py, checked before any expensive work.

`check_out_dir` refuses, with the flag in the message: an --out that is a file, that lies under a file,
that cannot be written (tried with a real temporary file, so root, read-only mounts and /proc all count),
and one that already holds files while neither --resume (continue that run) nor --overwrite (replace it)
was given: two runs in one directory would mix checkpoints, logs and predictions. `check_not_inside`
refuses an --out that resolves, symlinks followed, into an input such as the base model's directory.
"""
import os
import shutil
import tempfile

from .errors import ConfigError


def _nearest_existing(path):
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_out_dir(out, resume=False, overwrite=False, flag="--out"):
    """ConfigError unless `out` can hold this run (module docstring). Writes nothing that stays."""
    path = os.path.abspath(out)
    existing = _nearest_existing(path)
    if existing == path and not os.path.isdir(path):
        raise ConfigError(f"{flag} {out}: is a file, not a directory; choose a directory.")
    if not os.path.isdir(existing):
        raise ConfigError(f"{flag} {out}: {existing} is a file, so no directory can be made under it; choose "
                          "another directory.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".minilora-write-test-", dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{flag} {out}: cannot write in {existing} ({e.strerror}); choose a writable "
                          "directory.") from None
    if existing == path and not resume:
        held = sorted(os.listdir(path))
        if held and not overwrite:
            shown = ", ".join(held[:6]) + (" ..." if len(held) > 6 else "")
            raise ConfigError(f"{flag} {out} already holds files ({shown}): pass --resume to continue the run "
                              "that wrote them, --overwrite to replace it, or choose another directory.")


def check_not_inside(out, protected, what, flag="--out"):
    """ConfigError if `out` is `protected` or inside it, with symlinks resolved on both sides."""
    real_out, real_protected = os.path.realpath(out), os.path.realpath(protected)
    if real_out == real_protected or real_out.startswith(real_protected.rstrip(os.sep) + os.sep):
        raise ConfigError(f"{flag} {out} resolves to {real_out}, inside {what} {real_protected}; choose another "
                          "directory so that it is never overwritten.")


def remove_outputs(out, names):
    """--overwrite: remove the earlier run's outputs among `names` (files or directories) from `out`."""
    for name in names:
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
