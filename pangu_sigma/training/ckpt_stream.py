"""MindSpore .ckpt files one parameter at a time: an indexed reader and an atomic streaming writer.

A .ckpt file is a sequence of serialized `Checkpoint` protobuf messages, each
holding one `Value` (tag = parameter name, a TensorProto with dims, type name and
raw bytes); a large parameter is several consecutive Values with the same tag
(mindspore/train/serialization.py: _write_parameter_data, _parse_ckpt_proto;
the message layout is mindspore/train/checkpoint_pb2.py). The reader indexes
the byte ranges once and decodes a parameter only when asked, so merging or
converting never holds a whole model; the writer appends parameters to a
temporary file and renames it into place on close (never a half-written file
under the final name).
"""
import os
import re

import numpy as np
from mindspore.train.checkpoint_pb2 import Checkpoint

from locmoe.errors import ConfigError

NUMPY_OF_TYPE = {"Int8": np.int8, "UInt8": np.uint8, "Int16": np.int16, "UInt16": np.uint16, "Int32": np.int32,
                 "UInt32": np.uint32, "Int64": np.int64, "UInt64": np.uint64, "Float16": np.float16,
                 "Float32": np.float32, "Float64": np.float64, "Bool": np.bool_}
TYPE_OF_NUMPY = {np.dtype(v): k for k, v in NUMPY_OF_TYPE.items()}
SLICE_BYTES = 512 * 1024 * 1024  # MindSpore's SLICE_SIZE (512 MiB per protobuf Value)
TMP_PREFIX = ".tmp"  # temporary files of an unfinished write start with this


def _varint(data, pos):
    shift = value = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _encode_varint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class CheckpointReader:
    """Parameter names, shapes and values of one .ckpt file, decoded on demand."""

    def __init__(self, path, field="--checkpoint"):
        self.path = path
        self.field = field
        self._index = {}  # name -> [(offset, length)] of its Value messages, in order
        self._head = {}  # name -> (dims, type name)
        try:
            with open(path, "rb") as handle:
                data = handle.read()  # the index scan; values are re-read one at a time below
            self._scan(data)
        except (OSError, ValueError) as err:
            raise ConfigError(field, path, f"a MindSpore checkpoint this build can read ({err})") from None

    def _scan(self, data):
        end = len(data)
        if end >= 17 and data[end - 17:end - 10] == b"crc_num":
            end -= 17
        pos = 0
        while pos < end:
            key, pos = _varint(data, pos)
            if key != 0x0A:
                raise ValueError(f"unexpected protobuf field {key >> 3} at byte {pos}")
            length, pos = _varint(data, pos)
            if pos + length > end:
                raise ValueError(f"truncated value at byte {pos}")
            value = Checkpoint.Value.FromString(data[pos:pos + length])
            if not value.HasField("tensor"):
                raise ValueError(f"{value.tag}: map parameters are not supported")
            if value.tag not in self._index:
                self._index[value.tag] = []
                self._head[value.tag] = (tuple(value.tensor.dims), value.tensor.tensor_type)
            self._index[value.tag].append((pos, length))
            pos += length

    def names(self):
        return list(self._index)

    def __contains__(self, name):
        return name in self._index

    def shape(self, name):
        dims = self._head[name][0]
        return () if dims == (0,) else dims

    def read(self, name):
        """The parameter as a numpy array (its own dtype and shape)."""
        dims, type_name = self._head[name]
        if type_name not in NUMPY_OF_TYPE:
            raise ConfigError(self.field, self.path, f"numeric parameters ({name} has type {type_name})")
        chunks = []
        with open(self.path, "rb") as handle:
            for offset, length in self._index[name]:
                handle.seek(offset)
                chunks.append(Checkpoint.Value.FromString(handle.read(length)).tensor.tensor_content)
        array = np.frombuffer(b"".join(chunks), NUMPY_OF_TYPE[type_name])
        return array.reshape(self.shape(name)).copy()


class CheckpointWriter:
    """Write parameters one at a time into a .ckpt MindSpore's load_checkpoint reads.

    Use as a context manager: the file appears under its name only when the block
    ends without an exception (temporary name in the same folder, then rename).
    """

    def __init__(self, path):
        self.path = path
        self.tmp = os.path.join(os.path.dirname(path) or ".", f"{TMP_PREFIX}{os.getpid()}_{os.path.basename(path)}")
        self.names = set()
        self._handle = None

    def __enter__(self):
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._handle = open(self.tmp, "wb")
        return self

    def write(self, name, array):
        if name in self.names:
            raise ValueError(f"{name} written twice to {self.path}")
        array = np.asarray(array, order="C")  # (ascontiguousarray would make a scalar 1-d)
        type_name = TYPE_OF_NUMPY.get(array.dtype)
        if type_name is None:
            raise ValueError(f"{name}: dtype {array.dtype} cannot go into a checkpoint")
        raw = array.tobytes()
        dims = list(array.shape)  # [] for a scalar, as MindSpore writes it
        for start in range(0, max(len(raw), 1), SLICE_BYTES):
            message = Checkpoint()
            value = message.value.add()
            value.tag = name
            value.tensor.dims.extend(dims)
            value.tensor.tensor_type = type_name
            value.tensor.tensor_content = raw[start:start + SLICE_BYTES]
            self._handle.write(message.SerializeToString())
        self.names.add(name)

    def __exit__(self, exc_type, exc, tb):
        self._handle.flush()
        if exc_type is None:
            os.fsync(self._handle.fileno())
        self._handle.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        elif os.path.exists(self.tmp):
            os.remove(self.tmp)
        return False


def is_temporary(name):
    """A file name of an unfinished write (ours, the JSON writer's, or MindSpore's own .tmp)."""
    return name.startswith(TMP_PREFIX) or re.search(r"\.tmp\d*$", name) is not None


def remove_stale_temporaries(directory):
    """Delete the temporary files of interrupted saves in directory; call when no write of this
    process to it is in progress. Returns the names removed."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if is_temporary(name) and os.path.isfile(path):
            os.remove(path)
            removed.append(name)
    return removed
