"""Is a JPEG cut short only after its image data? A walk over the Huffman-coded scan that says so.

PIL (libjpeg) refuses a JPEG whose end-of-image marker ``FF D9`` is missing, although every pixel
may be there: some encoders leave the marker out, and a file cut by one or two bytes loses just
it. A file cut anywhere earlier is missing image data, which libjpeg would fill in with
made-up blocks. Telling the two apart from decoded pixels is unreliable (libjpeg holds back the
last row of blocks until it sees the marker, and decoding filler can reproduce the original by
chance), so this module decides it from the data itself: it reads the frame and Huffman tables,
then walks the entropy-coded segment MCU by MCU (ITU-T T.81, F.2.2: DC difference category and
bits, AC run/size symbols up to end-of-block, restart markers every ``Ri`` MCUs) and answers
whether every MCU of the image is present.

Only sequential Huffman JPEGs (SOF0 baseline, SOF1 extended) with a single scan over all their
components -- what cameras and libjpeg write by default -- can be checked; progressive,
multi-scan, lossless and arithmetic-coded files are reported incomplete (not recoverable).
"""

from __future__ import annotations

_SEQUENTIAL_SOF = (0xC0, 0xC1)
_UNSUPPORTED_SOF = (0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
_DHT, _SOS, _DRI, _DNL = 0xC4, 0xDA, 0xDD, 0xDC


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _huffman_lookup(counts: bytes, symbols: bytes, ac: bool) -> list[tuple[int, int] | None]:
    """A 16-bit-peek table: entry ``v`` is ``(bits, step)`` for the code that prefixes ``v``.

    ``bits`` is the code length plus the value bits that follow it; ``step`` is how far the
    coefficient index moves (AC: run + 1, 16 for ZRL, 0 for end-of-block; DC: 1).
    """
    table: list[tuple[int, int] | None] = [None] * 65536
    code, k = 0, 0
    for length in range(1, 17):
        for _ in range(counts[length - 1]):
            if k >= len(symbols):
                raise ValueError("Huffman table has fewer symbols than counted")
            run, size = (symbols[k] >> 4, symbols[k] & 15) if ac else (0, symbols[k])
            step = (0 if run != 15 else 16) if ac and size == 0 else run + 1
            shift = 16 - length
            table[code << shift:(code + 1) << shift] = [(length + size, step)] * (1 << shift)
            code += 1
            k += 1
        code <<= 1
    return table


def _bits(data: bytes) -> str:
    """The bits of ``data`` as a '0'/'1' string."""
    return bin(int.from_bytes(b"\x01" + data, "big"))[3:]


def _segments(data: bytes):
    """(marker, payload, end offset) of each marker segment up to and including SOS."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return
        marker = data[pos + 1]
        if marker == 0xFF:                              # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:    # markers without a length field
            pos += 2
            continue
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if end > len(data):
            return
        yield marker, data[pos + 4:end], end
        if marker == _SOS:
            return
        pos = end


def jpeg_frame_kind(data: bytes) -> int | None:
    """The start-of-frame marker of a JPEG (0xC0 baseline, 0xC1 extended, 0xC2 progressive, ...), or None when no
    frame header comes before the scan."""
    for marker, _, _ in _segments(data):
        if marker in _SEQUENTIAL_SOF or marker in _UNSUPPORTED_SOF:
            return marker
    return None


def _intervals(data: bytes) -> list[bytes]:
    """Entropy-coded data split at restart markers, with ``FF 00`` unstuffed; stops at any other marker."""
    out, current, i, n = [], bytearray(), 0, len(data)
    while i < n:
        byte = data[i]
        if byte != 0xFF:
            current.append(byte)
            i += 1
            continue
        if i + 1 >= n:                                  # a lone FF at the very end
            break
        follower = data[i + 1]
        if follower == 0x00:
            current.append(0xFF)
        elif 0xD0 <= follower <= 0xD7:
            out.append(bytes(current))
            current = bytearray()
        elif follower != 0xFF:                          # any other marker ends the scan
            break
        i += 2 if follower != 0xFF else 1
    out.append(bytes(current))
    return out


def jpeg_scan_complete(data: bytes) -> bool:
    """Whether ``data`` (a JPEG, end marker possibly missing) holds every MCU of its single scan."""
    if not data.startswith(b"\xff\xd8"):
        return False
    tables: dict[tuple[int, int], list] = {}
    frame, restart, scan_start, scan = None, 0, None, None
    try:
        for marker, payload, end in _segments(data):
            if marker in _UNSUPPORTED_SOF or marker == _DNL:
                return False
            if marker in _SEQUENTIAL_SOF:
                height, width = int.from_bytes(payload[1:3], "big"), int.from_bytes(payload[3:5], "big")
                count = payload[5]
                comps = {payload[6 + 3 * i]: (payload[7 + 3 * i] >> 4, payload[7 + 3 * i] & 15) for i in range(count)}
                frame = (height, width, comps)
            elif marker == _DHT:
                pos = 0
                while pos < len(payload):
                    klass, ident = payload[pos] >> 4, payload[pos] & 15
                    counts = payload[pos + 1:pos + 17]
                    total = sum(counts)
                    tables[(klass, ident)] = _huffman_lookup(counts, payload[pos + 17:pos + 17 + total], klass == 1)
                    pos += 17 + total
            elif marker == _DRI:
                restart = int.from_bytes(payload[:2], "big")
            elif marker == _SOS:
                count = payload[0]
                scan = [(payload[1 + 2 * i], payload[2 + 2 * i] >> 4, payload[2 + 2 * i] & 15) for i in range(count)]
                scan_start = end
    except (IndexError, ValueError):
        return False
    if frame is None or scan is None:
        return False
    height, width, comps = frame
    if height == 0 or len(scan) != len(comps) or any(c not in comps for c, _, _ in scan):
        return False
    hmax, vmax = max(h for h, _ in comps.values()), max(v for _, v in comps.values())
    if len(scan) == 1:                                  # one component: MCU = one block of it
        h, v = comps[scan[0][0]]
        mcus = _ceil(_ceil(width * h, hmax), 8) * _ceil(_ceil(height * v, vmax), 8)
        blocks = [scan[0]]
    else:                                               # interleaved: H*V blocks of each component per MCU
        mcus = _ceil(width, 8 * hmax) * _ceil(height, 8 * vmax)
        blocks = [entry for entry in scan for _ in range(comps[entry[0]][0] * comps[entry[0]][1])]
    try:
        coding = [(tables[(0, dc)], tables[(1, ac)]) for _, dc, ac in blocks]
    except KeyError:
        return False

    intervals = _intervals(data[scan_start:])
    per_interval = restart if restart else mcus
    if len(intervals) < _ceil(mcus, per_interval):
        return False
    for index in range(_ceil(mcus, per_interval)):
        bits = _bits(intervals[index])
        available, pos = len(bits), 0
        bits += "0" * 16                                # peeks past the end read zeros; checked below
        for _ in range(min(per_interval, mcus - index * per_interval)):
            for dc_table, ac_table in coding:
                entry = dc_table[int(bits[pos:pos + 16], 2)]
                if entry is None:
                    return False
                pos += entry[0]
                if pos > available:                     # the data ends inside this block
                    return False
                k = 1
                while k < 64:
                    entry = ac_table[int(bits[pos:pos + 16], 2)]
                    if entry is None:
                        return False
                    pos += entry[0]
                    if pos > available:
                        return False
                    if entry[1] == 0:                   # end of block
                        break
                    k += entry[1]
                if k > 64:                              # a run past the last coefficient
                    return False
    return True
