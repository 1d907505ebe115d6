"""The parts of a sentencepiece model file (`tokenizer.model`) that conversion to and from Hugging
Face needs, read and written without the protobuf package (which sentencepiece does not install).

The file is a serialized `ModelProto` (sentencepiece/src/sentencepiece_model.proto):

    ModelProto      1: repeated SentencePiece pieces  2: TrainerSpec  3: NormalizerSpec
                    (other fields kept as they are)
    SentencePiece   1: piece (string)  2: score (float)  3: type (enum, default NORMAL)
    TrainerSpec     3: model_type (UNIGRAM=1, BPE=2)  40-43: unk/bos/eos/pad id  45-48: pieces
    NormalizerSpec  1: name  2: precompiled_charsmap  3: add_dummy_prefix
                    4: remove_extra_whitespaces  5: escape_whitespaces (booleans default true)

Editing keeps every field we do not touch byte for byte, so the result is the same model apart
from what was changed. sentencepiece finds unk/bos/eos/pad by their pieces' names and types, not
by position, so reordering pieces moves ids without changing how text is cut.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterator

from memory3.hf import HFError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
# TrainerSpec fields naming the special tokens (ids, then pieces).
_UNK_ID, _BOS_ID, _EOS_ID, _PAD_ID = 40, 41, 42, 43
_UNK_PIECE, _BOS_PIECE, _EOS_PIECE, _PAD_PIECE = 45, 46, 47, 48


class ModelFileError(HFError):
    pass


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ModelFileError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 ids (-1) are written as 10-byte two's complement
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes, bytes]]:
    """(field number, wire type, value, the field's raw bytes) of each field of a message."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _read_varint(buf, pos)
        elif wire == _LEN:
            n, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == _FIXED32:
            value, pos = buf[pos:pos + 4], pos + 4
        elif wire == _FIXED64:
            value, pos = buf[pos:pos + 8], pos + 8
        else:
            raise ModelFileError(f"unsupported wire type {wire} in field {number}")
        if pos > len(buf):
            raise ModelFileError(f"truncated field {number}")
        yield number, wire, value, buf[start:pos]


def _field(number: int, wire: int, payload: bytes) -> bytes:
    key = _varint(number << 3 | wire)
    return key + (_varint(len(payload)) + payload if wire == _LEN else payload)


def _int_field(number: int, value: int) -> bytes:
    return _field(number, _VARINT, _varint(value))


def _str_field(number: int, value: str) -> bytes:
    return _field(number, _LEN, value.encode())


@dataclass
class Piece:
    piece: str
    score: float = 0.0
    type: int = NORMAL

    def serialize(self) -> bytes:
        out = _str_field(1, self.piece) + _field(2, _FIXED32, struct.pack("<f", self.score))
        return out + (_int_field(3, self.type) if self.type != NORMAL else b"")


@dataclass
class SentencePieceModel:
    pieces: list[Piece]
    trainer_spec: bytes = b""
    normalizer_spec: bytes = b""
    other_fields: list[bytes] = field(default_factory=list)  # raw, written back unchanged

    @classmethod
    def parse(cls, data: bytes) -> "SentencePieceModel":
        model = cls(pieces=[])
        for number, wire, value, raw in _fields(data):
            if number == 1 and wire == _LEN:
                piece = Piece("")
                for n, w, v, _ in _fields(value):
                    if n == 1:
                        piece.piece = v.decode()
                    elif n == 2 and w == _FIXED32:
                        piece.score = struct.unpack("<f", v)[0]
                    elif n == 3:
                        piece.type = v
                model.pieces.append(piece)
            elif number == 2 and wire == _LEN:
                model.trainer_spec = value
            elif number == 3 and wire == _LEN:
                model.normalizer_spec = value
            else:
                model.other_fields.append(raw)
        if not model.pieces:
            raise ModelFileError("no pieces: not a sentencepiece model")
        return model

    def serialize(self) -> bytes:
        out = b"".join(_field(1, _LEN, p.serialize()) for p in self.pieces)
        out += _field(2, _LEN, self.trainer_spec) + _field(3, _LEN, self.normalizer_spec)
        return out + b"".join(self.other_fields)

    @property
    def model_type(self) -> int:
        found = [v for n, _, v, _ in _fields(self.trainer_spec) if n == 3]
        return found[-1] if found else UNIGRAM

    def normalizer(self) -> dict[str, object]:
        """name, precompiled (a character map is present), add_dummy_prefix,
        remove_extra_whitespaces, escape_whitespaces."""
        out: dict[str, object] = {"name": "", "precompiled": False, "add_dummy_prefix": True,
                                  "remove_extra_whitespaces": True, "escape_whitespaces": True}
        names = {3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}
        for n, _, v, _ in _fields(self.normalizer_spec):
            if n == 1:
                out["name"] = v.decode()
            elif n == 2:
                out["precompiled"] = len(v) > 0
            elif n in names:
                out[names[n]] = bool(v)
        return out

    def set_special_pieces(self, unk: str, bos: str, eos: str, pad: str) -> None:
        """Name the special pieces (and their ids, as positions in `pieces`) in the TrainerSpec."""
        ids = {p.piece: i for i, p in enumerate(self.pieces)}
        drop = {_UNK_ID, _BOS_ID, _EOS_ID, _PAD_ID, _UNK_PIECE, _BOS_PIECE, _EOS_PIECE, _PAD_PIECE}
        spec = b"".join(raw for n, _, _, raw in _fields(self.trainer_spec) if n not in drop)
        for id_field, piece_field, name in ((_UNK_ID, _UNK_PIECE, unk), (_BOS_ID, _BOS_PIECE, bos),
                                            (_EOS_ID, _EOS_PIECE, eos), (_PAD_ID, _PAD_PIECE, pad)):
            spec += _int_field(id_field, ids[name]) + _str_field(piece_field, name)
        self.trainer_spec = spec
