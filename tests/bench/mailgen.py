"""
Generate realistic mbox files for benchmarks, deterministically from a seed.

Messages range from a few KB of text to MB attachments (base64 bodies, 76
character lines), with RFC 5322 headers, MIME structure, body lines that
begin with C{From } (written mboxrd-quoted as C{>From }, and C{>From } as
C{>>From }) and lines that begin with C{.} (which POP3 must dot-stuff).
Files are written sequentially, one message at a time, so memory stays
bounded whatever the target size; the output appears atomically (written to
a temporary name, then renamed), so a file that exists is complete.

    python tests/bench/mailgen.py OUT.mbox --size 200M [--seed 1]
    python tests/bench/mailgen.py OUT.mbox --single 50M     # one big message
    python tests/bench/mailgen.py OUT.mbox --count 3        # a few small ones
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import re
import sys
import time
from collections.abc import Iterator

WORDS = (
    "the of and to in is it that for on with as was at by be this have from or an are not "
    "meeting report invoice schedule project budget review deadline attached please regards "
    "thanks server mailbox delivery message update release quarterly numbers draft contract "
    "Monday Tuesday tomorrow office team customer support ticket question answer summary note "
    "From from From. .dot ..double invoice#2041 https://example.org/a/b?c=d 42 3.14 2024 "
    "naïve café über résumé"
).split()

NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
DOMAINS = ["example.com", "example.org", "example.net", "mail.example.edu"]
DAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
ATTACH_TYPES = [
    ("application/pdf", "report.pdf"),
    ("image/jpeg", "photo.jpg"),
    ("application/zip", "archive.zip"),
    ("application/vnd.openxmlformats-officedocument.wordprocessingml.document", "draft.docx"),
]

# (share of messages, min bytes, max bytes); the mean is about 68 KB, so a
# 1 GB mbox holds about 15,000 messages.
SIZE_CLASSES = [
    (0.750, 2_000, 20_000),
    (0.200, 20_000, 150_000),
    (0.045, 150_000, 1_000_000),
    (0.005, 1_000_000, 6_000_000),
]

_FROM_LINE = re.compile(rb"^(>*From )", re.M)


def parse_size(text: str) -> int:
    """C{"200M"}, C{"1G"}, C{"512K"} or a plain number of bytes."""
    text = text.strip().upper()
    factor = 1
    for suffix, f in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if text.endswith(suffix) or text.endswith(suffix + "B"):
            factor = f
            text = text.rstrip("B")[:-1]
            break
    return int(float(text) * factor)


class _Gen:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        rng = self.rng
        # A pool of text lines to draw bodies from, so that generation is fast.
        pool = []
        for _ in range(4000):
            n = rng.randint(3, 14)
            line = " ".join(rng.choice(WORDS) for _ in range(n))
            pool.append(line[0].upper() + line[1:])
        # Lines that start with "From " (an mbox hazard) or "." (dot-stuffing).
        pool += [
            "From the desk of the director: please read.",
            "From here on, we use the new address.",
            ">From an earlier quoted message",
            ".",
            ". a line that starts with a dot",
            "..two dots",
            "",
            "",
            "",
        ] * 10
        self.pool = pool
        self.n = 0

    def _addr(self) -> str:
        return f"{self.rng.choice(NAMES)}@{self.rng.choice(DOMAINS)}"

    def _date(self) -> tuple[str, str]:
        rng = self.rng
        day, mon = rng.randint(1, 28), rng.randrange(12)
        year, h, m, s = (
            rng.randint(2015, 2024),
            rng.randrange(24),
            rng.randrange(60),
            rng.randrange(60),
        )
        wd = DAYS[rng.randrange(7)]
        ctime = f"{wd} {MONTHS[mon]} {day:2d} {h:02d}:{m:02d}:{s:02d} {year}"
        rfc = f"{wd}, {day} {MONTHS[mon]} {year} {h:02d}:{m:02d}:{s:02d} +0000"
        return ctime, rfc

    def _text(self, size: int) -> bytes:
        out: list[str] = []
        total = 0
        while total < size:
            chunk = self.rng.choices(self.pool, k=64)
            out.extend(chunk)
            total += sum(len(x) + 1 for x in chunk)
        text = "\n".join(out).encode("utf-8")[:size]
        return text[: text.rfind(b"\n") + 1] if b"\n" in text else text + b"\n"

    def message(self, size: int, attach: bool | None = None) -> bytes:
        """One message of about C{size} bytes, mboxrd-quoted, ending with LF."""
        rng = self.rng
        self.n += 1
        sender = self._addr()
        ctime, rfc = self._date()
        boundary = f"=_bench_{self.n}_{rng.getrandbits(32):08x}"
        if attach is None:
            attach = size > 40_000 and rng.random() < 0.85
        subject = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
        headers = [
            f"From {sender} {ctime}",
            f"Return-Path: <{sender}>",
            f"Received: from mx{rng.randint(1, 9)}.{rng.choice(DOMAINS)} "
            f"(mx.{rng.choice(DOMAINS)} [192.0.2.{rng.randint(1, 254)}])",
            f"\tby mail.example.com with ESMTPS id {rng.getrandbits(48):012x}",
            f"\tfor <user@example.com>; {rfc}",
            f"From: {sender.split('@')[0].title()} <{sender}>",
            "To: user@example.com",
            f"Subject: {subject}",
            f"Date: {rfc}",
            f"Message-ID: <{self.n}.{rng.getrandbits(64):016x}@{rng.choice(DOMAINS)}>",
            "MIME-Version: 1.0",
        ]
        parts: list[bytes] = []
        if attach:
            text_size = min(size // 10, rng.randint(500, 8000))
            raw_size = max(0, (size - text_size - 1200) * 3 // 4)
            ctype, fname = rng.choice(ATTACH_TYPES)
            headers.append(f'Content-Type: multipart/mixed; boundary="{boundary}"')
            parts.append(b"\nThis is a multi-part message in MIME format.\n\n")
            parts.append(
                f"--{boundary}\nContent-Type: text/plain; charset=utf-8\n"
                "Content-Transfer-Encoding: 8bit\n\n".encode()
            )
            parts.append(_FROM_LINE.sub(rb">\1", self._text(text_size)))
            parts.append(
                f'\n--{boundary}\nContent-Type: {ctype}; name="{fname}"\n'
                "Content-Transfer-Encoding: base64\n"
                f'Content-Disposition: attachment; filename="{fname}"\n\n'.encode()
            )
            parts.append(base64.encodebytes(rng.randbytes(raw_size)))
            parts.append(f"\n--{boundary}--\n".encode())
        else:
            headers.append("Content-Type: text/plain; charset=utf-8")
            headers.append("Content-Transfer-Encoding: 8bit")
            parts.append(b"\n")
            parts.append(_FROM_LINE.sub(rb">\1", self._text(max(200, size - 700))))
        return ("\n".join(headers) + "\n").encode() + b"".join(parts)

    def mixed_size(self) -> int:
        r = self.rng.random()
        for share, low, high in SIZE_CLASSES:
            if r < share:
                # log-uniform inside the class
                return int(low * (high / low) ** self.rng.random())
            r -= share
        return SIZE_CLASSES[0][1]


def iter_messages(total: int, seed: int = 1) -> Iterator[bytes]:
    """Messages of the mixed distribution until about C{total} bytes."""
    gen = _Gen(seed)
    written = 0
    while written < total:
        size = min(gen.mixed_size(), max(2000, total - written))
        msg = gen.message(size)
        written += len(msg) + 1
        yield msg


def write_mbox(path: str, messages: Iterator[bytes]) -> tuple[int, int]:
    """
    Write C{messages} (each ending with LF) to C{path} atomically, a blank
    line after each.  Returns (messages, bytes).
    """
    tmp = f"{path}.tmp{os.getpid()}"
    count = size = 0
    try:
        with open(tmp, "wb", buffering=1 << 20) as f:
            for msg in messages:
                f.write(msg)
                f.write(b"\n")
                count += 1
                size += len(msg) + 1
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return count, size


def generate_mixed(path: str, total: int, seed: int = 1) -> tuple[int, int]:
    """A mixed mailbox of about C{total} bytes."""
    return write_mbox(path, iter_messages(total, seed))


def generate_single(path: str, size: int, seed: int = 1) -> tuple[int, int]:
    """One message of about C{size} bytes: a short text and a base64 attachment."""
    return write_mbox(path, iter([_Gen(seed).message(size, attach=True)]))


def generate_small(path: str, count: int = 3, seed: int = 1) -> tuple[int, int]:
    """A few small text messages (for login and idle-session scenarios)."""
    gen = _Gen(seed)
    return write_mbox(
        path, (gen.message(gen.rng.randint(1500, 6000), attach=False) for _ in range(count))
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("out")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--size", help="target total size of a mixed mailbox, e.g. 200M, 1G")
    g.add_argument("--single", help="one message of this size, e.g. 50M")
    g.add_argument("--count", type=int, help="this many small text messages")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    t0 = time.monotonic()
    if args.size:
        n, size = generate_mixed(args.out, parse_size(args.size), args.seed)
    elif args.single:
        n, size = generate_single(args.out, parse_size(args.single), args.seed)
    else:
        n, size = generate_small(args.out, args.count, args.seed)
    print(
        f"{args.out}: {n} messages, {size} bytes in {time.monotonic() - t0:.1f} s", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
