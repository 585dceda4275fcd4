"""TensorBoard scalar event files, written and read without tensorboard or tensorflow.

An event file is a sequence of TFRecords: uint64 length (little endian), masked CRC-32C of those 8 bytes, the data,
masked CRC-32C of the data. Each record's data is an `Event` protocol buffer; the first one carries
`file_version: "brain.Event:2"`, the others `wall_time`, `step` and a `Summary` of `Value{tag, simple_value}`. The few
protobuf fields are encoded by hand (field numbers from tensorflow/core/util/event.proto and
tensorflow/core/framework/summary.proto):

    Event:   1 wall_time (double)   2 step (int64)   3 file_version (string)   5 summary (Summary)
    Summary: 1 value (repeated Value)
    Value:   1 tag (string)   2 simple_value (float)

    writer = EventWriter('output/run/tensorboard')     # creates the folder and events.out.tfevents.<time>.<host>...
    writer.add_scalars(step, {'train/loss_ita': 4.2, 'train/lr': 1e-4})
    writer.flush(); writer.close()
    read_scalars('output/run/tensorboard')             # {tag: [(step, value), ...]}
"""
import glob
import os
import socket
import struct
import time

FILE_VERSION = 'brain.Event:2'

# ---- CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord framing uses -----------------------------
_CRC_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The TFRecord mask: rotate right by 15 bits and add a constant (tensorflow/core/lib/hash/crc32c.h)."""
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """One TFRecord around `data`."""
    length = struct.pack('<Q', len(data))
    return length + struct.pack('<I', masked_crc32c(length)) + data + struct.pack('<I', masked_crc32c(data))


# ---- protobuf wire format, the few pieces we need ----------------------------------------------------------------
def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 negatives are sent as their 64-bit two's complement (10 bytes)
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _key(field_number: int, wire_type: int) -> bytes:
    return _varint((field_number << 3) | wire_type)


def _bytes_field(field_number: int, payload: bytes) -> bytes:
    return _key(field_number, 2) + _varint(len(payload)) + payload


def encode_value(tag: str, value: float) -> bytes:
    return _bytes_field(1, tag.encode('utf-8')) + _key(2, 5) + struct.pack('<f', float(value))


def encode_event(wall_time: float, step: int = 0, file_version: str = None, scalars: dict = None) -> bytes:
    out = _key(1, 1) + struct.pack('<d', float(wall_time))
    if step:
        out += _key(2, 0) + _varint(int(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode('utf-8'))
    if scalars:
        summary = b''.join(_bytes_field(1, encode_value(tag, v)) for tag, v in scalars.items())
        out += _bytes_field(5, summary)
    return out


class EventWriter:
    """Appends scalar summaries to one new event file in `log_dir` (TensorBoard reads the folder)."""

    _count = 0

    def __init__(self, log_dir, filename_suffix=''):
        os.makedirs(log_dir, exist_ok=True)
        EventWriter._count += 1
        name = (f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.'
                f'{EventWriter._count}{filename_suffix}')
        self.path = os.path.join(log_dir, name)
        self._file = open(self.path, 'wb')
        self._file.write(frame(encode_event(time.time(), file_version=FILE_VERSION)))
        self._file.flush()

    def add_scalars(self, step, scalars, wall_time=None):
        """One event at `step` holding every `{tag: number}` (non-numbers are skipped)."""
        values = {str(k): float(v) for k, v in scalars.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if values:
            self._file.write(frame(encode_event(time.time() if wall_time is None else wall_time, int(step),
                                                scalars=values)))

    def add_scalar(self, tag, value, step, wall_time=None):
        self.add_scalars(step, {tag: value}, wall_time)

    def flush(self):
        if not self._file.closed:
            self._file.flush()

    def close(self):
        if not self._file.closed:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- reading back -----------------------------------------------------------------------------------------------
class EventFileError(ValueError):
    """A record is truncated or fails its CRC."""


def read_records(path):
    """The data of every TFRecord of a file, checking both CRCs."""
    with open(path, 'rb') as f:
        blob = f.read()
    pos, out = 0, []
    while pos < len(blob):
        if pos + 12 > len(blob):
            raise EventFileError(f'{path}: truncated record header at byte {pos}')
        header = blob[pos:pos + 8]
        (length,) = struct.unpack('<Q', header)
        (crc,) = struct.unpack('<I', blob[pos + 8:pos + 12])
        if crc != masked_crc32c(header):
            raise EventFileError(f'{path}: bad length CRC at byte {pos}')
        data = blob[pos + 12:pos + 12 + length]
        if len(data) != length or pos + 16 + length > len(blob):
            raise EventFileError(f'{path}: truncated record at byte {pos}')
        (crc,) = struct.unpack('<I', blob[pos + 12 + length:pos + 16 + length])
        if crc != masked_crc32c(data):
            raise EventFileError(f'{path}: bad data CRC at byte {pos}')
        out.append(data)
        pos += 16 + length
    return out


def _read_varint(buf, pos):
    shift = value = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf):
    """(field number, wire type, value) of a protobuf message (varint, fixed64, bytes, fixed32)."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise EventFileError(f'unsupported protobuf wire type {wire}')
        yield number, wire, value


def decode_event(data):
    """{'wall_time', 'step', 'file_version' (or None), 'scalars': {tag: value}} of one Event."""
    event = {'wall_time': 0.0, 'step': 0, 'file_version': None, 'scalars': {}}
    for number, wire, value in _fields(data):
        if number == 1 and wire == 1:
            event['wall_time'] = struct.unpack('<d', value)[0]
        elif number == 2 and wire == 0:
            event['step'] = value - (1 << 64) if value >= 1 << 63 else value
        elif number == 3 and wire == 2:
            event['file_version'] = value.decode('utf-8')
        elif number == 5 and wire == 2:
            for n_value, w_value, raw_value in _fields(value):
                if n_value != 1 or w_value != 2:
                    continue
                tag, simple = None, None
                for n, w, v in _fields(raw_value):
                    if n == 1 and w == 2:
                        tag = v.decode('utf-8')
                    elif n == 2 and w == 5:
                        simple = struct.unpack('<f', v)[0]
                if tag is not None and simple is not None:
                    event['scalars'][tag] = simple
    return event


def read_events(path):
    """Every event of one file, decoded."""
    return [decode_event(data) for data in read_records(path)]


def read_scalars(log_dir_or_file):
    """{tag: [(step, value), ...]} over every event file of a folder (or one file), in file and write order."""
    paths = ([log_dir_or_file] if os.path.isfile(log_dir_or_file)
             else sorted(glob.glob(os.path.join(log_dir_or_file, '*tfevents*'))))
    out = {}
    for path in paths:
        for event in read_events(path):
            for tag, value in event['scalars'].items():
                out.setdefault(tag, []).append((event['step'], value))
    return out
