"""The output folder of prepare and the corpus builders: checked first, built as a temporary folder next
to it and renamed into place only when complete."""
import contextlib
import os
import shutil
import tempfile

from locmoe.errors import ConfigError, ctrl_c_deferred


def check_creatable(path, field):
    """Writes nothing: path is a folder, or can be made inside a folder this process can write to."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(field, path, "a folder (a file of that name exists)")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(field, path, f"a folder that can be created ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(field, path, f"a writable folder ({existing} is not writable)")


def check_paths(input_dir, output_dir, overwrite):
    input_dir = os.path.abspath(input_dir)
    output_dir = os.path.abspath(output_dir)
    if not os.path.isdir(input_dir):
        raise ConfigError("input", input_dir, "an existing folder (one subfolder per domain, or text files)")
    if os.path.commonpath([input_dir, output_dir]) in (input_dir, output_dir):
        raise ConfigError("output", output_dir, f"a folder outside the input folder {input_dir} and not containing it")
    if os.path.lexists(output_dir):
        if not overwrite:
            raise ConfigError("output", output_dir, "a folder that does not exist yet (pass --overwrite to replace it)")
        if not os.path.isdir(output_dir) or os.path.islink(output_dir):
            raise ConfigError("output", output_dir, "a folder to replace (it exists but is not a folder)")
    check_creatable(os.path.dirname(output_dir), "output")  # the temporary folder goes next to it
    return input_dir, output_dir


def make_temp_dir(output_dir):
    """An empty folder next to output_dir, with the permissions a plain mkdir would give."""
    parent = os.path.dirname(output_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        temp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp-", dir=parent)
    except OSError as error:
        raise ConfigError("output", output_dir, f"a folder in a writable place ({error.strerror or error})") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp_dir, 0o777 & ~umask)
    return temp_dir


def move_into_place(temp_dir, output_dir):
    """Renames the finished temp folder to output_dir; an old output_dir is removed only afterwards."""
    old_dir = None
    if os.path.lexists(output_dir):
        old_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.old-", dir=os.path.dirname(output_dir))
        os.rmdir(old_dir)
        os.rename(output_dir, old_dir)
    os.rename(temp_dir, output_dir)
    if old_dir:
        shutil.rmtree(old_dir)


@contextlib.contextmanager
def built_in_temp(output_dir, on_commit=None, log=None):
    """Yields an empty temporary folder next to output_dir for the body to fill; when the body ends, the folder is
    renamed to output_dir while Ctrl-C waits (never half done). If the body fails or is interrupted, output_dir is
    as it was and the temporary folder is removed, also while Ctrl-C waits. on_commit() runs right after the
    rename, before Ctrl-C is taken again (a command passes settle_for_exit: it then only reports and exits).
    log(line), if given, reports a Ctrl-C that came during the rename (it found the output complete)."""
    with ctrl_c_deferred():  # the folder exists only once the finally below will remove it
        temp_dir = make_temp_dir(output_dir)
    try:
        yield temp_dir
        with ctrl_c_deferred(swallow=True) as late_ctrl_c:
            move_into_place(temp_dir, output_dir)
            if on_commit is not None:
                on_commit()
        if late_ctrl_c and log is not None:
            log(f"Ctrl-C came as {output_dir} was renamed into place; it is complete")
    finally:
        with ctrl_c_deferred(swallow=True):  # an interrupt or error already on its way, or the output complete
            if os.path.isdir(temp_dir):
                shutil.rmtree(temp_dir)
