"""JSON output shared by the entry points and the tools: JSON-safe values, an atomic writer."""
import json
import math


def _plain(value):
    """JSON-safe copy: numpy scalars/arrays to Python, non-finite floats to None."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(payload):
    return json.dumps(_plain(payload), indent=2, sort_keys=True)


def write_json(path, payload):
    """Atomic: a temp file next to path, then renamed over it."""
    import os

    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(dumps(payload) + "\n")
    os.replace(tmp, path)
