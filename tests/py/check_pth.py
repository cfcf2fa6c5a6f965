"""Check .pth files the way torch.load(weights_only=True) would take them, without torch.

    python3 tests/py/check_pth.py FILE.pth [FILE.pth ...]

For each file: a zip whose entries share one top-level folder, with data.pkl, version and
byteorder ("little"); every data/<key> record starts on a 64-byte boundary; data.pkl uses only
the opcodes and globals torch's weights_only unpickler accepts (torch/_weights_only_unpickler.py);
unpickled with a restricted unpickler (only those globals, storages as persistent ids), it is an
OrderedDict of name -> contiguous tensor whose record holds exactly numel * itemsize bytes.
Prints one JSON line: {file: {name: {"dtype", "shape", "sum"}}}; exits 1 with the reason otherwise.
"""
import collections
import json
import pickle
import pickletools
import struct
import sys
import zipfile

import numpy as np

# The opcodes torch's weights_only unpickler handles (its get_globals_in_pkl table plus the
# ones read inline: GLOBAL, BINUNICODE, SHORT_BINSTRING, LONG1, PROTO, STOP).
ALLOWED_OPCODES = {
    "NEWOBJ", "REDUCE", "BUILD", "APPEND", "APPENDS", "SETITEM", "SETITEMS", "MARK", "TUPLE",
    "TUPLE1", "TUPLE2", "TUPLE3", "NONE", "NEWFALSE", "NEWTRUE", "EMPTY_TUPLE", "EMPTY_LIST",
    "EMPTY_DICT", "EMPTY_SET", "BINPERSID", "BININT", "BININT1", "BININT2", "BINFLOAT", "BINGET",
    "LONG_BINGET", "BINPUT", "LONG_BINPUT", "GLOBAL", "BINUNICODE", "SHORT_BINSTRING", "LONG1",
    "PROTO", "STOP",
}
# The globals a state dict of plain tensors needs (all on torch's default allow list).
STORAGES = {
    "torch.FloatStorage": ("<f4", 4),
    "torch.HalfStorage": ("<f2", 2),
    "torch.BFloat16Storage": ("bf16", 2),
    "torch.DoubleStorage": ("<f8", 8),
}
ALLOWED_GLOBALS = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", *STORAGES}


class Fail(Exception):
    pass


class Storage:
    def __init__(self, cls, key, location, numel):
        self.cls, self.key, self.location, self.numel = cls, key, location, numel


class Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


def rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    return Tensor(storage, offset, size, stride)


class StorageClass:
    def __init__(self, name):
        self.name = name


class Restricted(pickle.Unpickler):
    def find_class(self, module, name):
        full = f"{module}.{name}"
        if full not in ALLOWED_GLOBALS:
            raise Fail(f"global {full} is not allowed")
        if full == "collections.OrderedDict":
            return collections.OrderedDict
        if full == "torch._utils._rebuild_tensor_v2":
            return rebuild_tensor_v2
        return StorageClass(full)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise Fail(f"persistent id {pid!r} is not a storage")
        _, cls, key, location, numel = pid
        if not isinstance(cls, StorageClass):
            raise Fail(f"storage class {cls!r}")
        return Storage(cls.name, key, location, numel)


def contiguous_strides(size):
    s, acc = [], 1
    for d in reversed(size):
        s.append(acc)
        acc *= d
    return tuple(reversed(s))


def local_data_offset(raw, info):
    # Local file header: 30 bytes, then the name and the extra field.
    sig, *_ = struct.unpack_from("<I", raw, info.header_offset)
    if sig != 0x04034B50:
        raise Fail(f"{info.filename}: bad local header")
    name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
    return info.header_offset + 30 + name_len + extra_len


def check(path):
    raw = open(path, "rb").read()
    z = zipfile.ZipFile(path)
    names = z.namelist()
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1:
        raise Fail(f"entries under several folders: {sorted(roots)}")
    root = roots.pop()
    for need in ("data.pkl", "version"):
        if f"{root}/{need}" not in names:
            raise Fail(f"no {root}/{need}")
    if f"{root}/byteorder" in names and z.read(f"{root}/byteorder") != b"little":
        raise Fail("byteorder is not little")
    if z.testzip() is not None:
        raise Fail("a CRC does not match")
    for info in z.infolist():
        if info.compress_type != zipfile.ZIP_STORED:
            raise Fail(f"{info.filename} is compressed")
        if "/data/" in info.filename and local_data_offset(raw, info) % 64:
            raise Fail(f"{info.filename} is not 64-byte aligned")
    pkl = z.read(f"{root}/data.pkl")
    for op, arg, _ in pickletools.genops(pkl):
        if op.name not in ALLOWED_OPCODES:
            raise Fail(f"opcode {op.name} is not allowed")
        if op.name == "GLOBAL":
            full = arg.replace(" ", ".")
            if full not in ALLOWED_GLOBALS:
                raise Fail(f"global {full} is not allowed")
        if op.name == "PROTO" and arg > 2:
            raise Fail(f"pickle protocol {arg} (torch.save writes 2)")
    import io

    sd = Restricted(io.BytesIO(pkl)).load()
    if not isinstance(sd, collections.OrderedDict):
        raise Fail(f"top level is {type(sd).__name__}, not an OrderedDict")
    out = {}
    for name, t in sd.items():
        if not isinstance(t, Tensor):
            raise Fail(f"{name} is not a tensor")
        numel = int(np.prod(t.size)) if t.size else 1
        if t.stride != contiguous_strides(t.size) or t.offset != 0:
            raise Fail(f"{name}: not contiguous (stride {t.stride}, offset {t.offset})")
        fmt, itemsize = STORAGES[t.storage.cls]
        data = z.read(f"{root}/data/{t.storage.key}")
        if len(data) != t.storage.numel * itemsize or t.storage.numel != numel:
            raise Fail(f"{name}: record of {len(data)} bytes for {numel} x {itemsize}")
        if fmt == "bf16":
            v = (np.frombuffer(data, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            v = np.frombuffer(data, fmt)
        out[name] = {"dtype": t.storage.cls.split(".")[1], "shape": list(t.size), "sum": float(v.astype(np.float64).sum())}
    return out


def main():
    result = {}
    for p in sys.argv[1:]:
        try:
            result[p] = check(p)
        except Fail as e:
            print(f"{p}: {e}")
            sys.exit(1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
