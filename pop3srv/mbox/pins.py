# -*- test-case-name: tests.test_foreign_mbox -*-
"""
Which UIDL each message of an mbox gets, so that it never changes.

A message's UIDL is decided when the server first indexes it, which is
before any client can see it, and the index keeps it from then on whatever
the format setting says later: a commit shifts records and keeps their
UIDLs, and a rescan finds a message again by its digest and ordinal (see
L{pop3srv.mbox.index}).  A UIDL is kept as a string (I{pinned}) unless it
is our own, which the digest and ordinal give back.

The candidates for a newly indexed message, in order:

 1. the value of its C{X-UIDL} field (written by qpopper), if it is a
    valid UIDL and C{X-UIDL} is reused (as Dovecot's C{pop3_reuse_xuidl}
    does when set; see L{xuidl_reused});
 2. the configured C{pop3_uidl_format} (L{UidlFormat}), if the message
    has every value it needs: C{%u} its IMAP UID (C{X-UID}, read as
    Dovecot reads it, L{UidSequence}), C{%v} the file's UIDVALIDITY
    (C{X-IMAPbase}, or C{X-IMAP} in the pseudo-message), C{%m} and C{%g}
    the header MD5;
 3. our own: the hex of its digest, plus C{.N} for the Nth identical
    message (L{own_uidl}).

A candidate another message of the maildrop already has is passed over,
so UIDLs stay unique even if a sender forges those fields; so is one that
looks like our own, which keeps the two kinds apart, and one a message
that left the maildrop had (a client may remember it: the index keeps
them, see L{pop3srv.mbox.index}).  One exception: when another program
rewrote the file, a message whose candidate is the UIDL of a message of
the earlier index that is not in the file any more is that message,
rewritten (a header changed, say), and gets its UIDL back.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable

from pop3srv.mbox.scan import DIGEST_SIZE, MessageMeta
from pop3srv.mbox.uidlformat import UidlFormat, is_valid_uidl

# The shape of our own UIDLs: the hex of a digest, maybe an ordinal.
_OWN_SHAPE = re.compile(rb"[0-9a-f]{%d}(?:\.[0-9]+)?\Z" % (2 * DIGEST_SIZE,))

#: The keys of a format that an mbox message can give.
MBOX_KEYS = frozenset("uvmg")

#: The largest IMAP UID: they are 32-bit numbers.
MAX_UID = 0xFFFFFFFF


def xuidl_reused(setting: bool | None, fmt: UidlFormat | None) -> bool:
    """
    Whether C{X-UIDL} fields give UIDLs.

    @param setting: C{True} or C{False} as configured, or L{None} for
        automatic: reused unless a format is given.  Without one the old
        server was most likely qpopper, which wrote them; with one it was
        Dovecot, which by default (C{pop3_reuse_xuidl = no}) ignores them,
        so reusing one would change that message's UIDL.
    @param fmt: the configured format.
    """
    return fmt is None if setting is None else setting


def own_uidl(digest: bytes, ordinal: int) -> bytes:
    """
    Our own UIDL of a message: the hex of its digest, plus C{.N} for
    ordinal N > 0.
    """
    uid = digest.hex().encode("ascii")
    if ordinal:
        uid += b".%d" % (ordinal,)
    return uid


def looks_own(uidl: bytes) -> bool:
    """Whether C{uidl} has the shape of one of our own (L{own_uidl})."""
    return _OWN_SHAPE.match(uidl) is not None


class UidSequence:
    """
    The IMAP UIDs of an mbox's messages, read from C{X-UID} as Dovecot
    reads them: a UID must be above the one before it and at most the next
    free one (so a forged C{X-UID} in incoming mail is not believed), and a
    message without an acceptable one takes the next free UID (which
    Dovecot would write into it).  Once the next free UID is past
    L{MAX_UID} (an C{X-IMAPbase} that says so, from anyone), no message
    has one: Dovecot would renumber them all under a new UIDVALIDITY, so
    no UIDL made of them could match.

    @ivar uidvalidity: the file's UIDVALIDITY, 0 if unknown.
    @ivar next_uid: the next free UID.
    @ivar prev_uid: the UID of the last message read.
    """

    def __init__(self, uidvalidity: int = 0, next_uid: int = 1, prev_uid: int = 0) -> None:
        self.uidvalidity = uidvalidity
        self.next_uid = next_uid
        self.prev_uid = prev_uid

    def state(self) -> tuple[int, int, int]:
        """C{(uidvalidity, next_uid, prev_uid)}, as the index stores them."""
        return self.uidvalidity, self.next_uid, self.prev_uid

    def file_starts(self, meta: MessageMeta | None) -> None:
        """
        Read the first message of the file (the pseudo-message, if any):
        its C{X-IMAPbase} or C{X-IMAP} starts the sequence afresh.  If it
        has none, the sequence goes on from what the index remembers.
        """
        if meta is not None and meta.uidvalidity:
            self.uidvalidity = meta.uidvalidity
            self.next_uid = meta.uid_last + 1
            self.prev_uid = 0

    def advance(self, meta: MessageMeta | None) -> int | None:
        """
        Read the next message (not the pseudo-message).

        @return: its UID if its header gives one that fits, else L{None}.
        """
        if self.next_uid > MAX_UID:
            return None
        for uid in meta.uids if meta is not None else ():
            if uid == self.next_uid:
                self.next_uid += 1
            elif uid > self.next_uid or uid <= self.prev_uid:
                continue
            self.prev_uid = uid
            return uid
        self.prev_uid = self.next_uid
        self.next_uid += 1
        return None


class UidlChooser:
    """
    Chooses the UIDLs of newly indexed messages, in file order.

    @ivar sequence: the file's UIDs so far.
    """

    def __init__(
        self,
        fmt: UidlFormat | None,
        sequence: UidSequence,
        reserved: Callable[[], Iterable[bytes]] = tuple,
        *,
        xuidl: bool = True,
        held: Collection[bytes] = (),
    ) -> None:
        """
        @param fmt: the configured format, or L{None} for our own UIDLs.
        @param sequence: where the file's UIDs stand before the first
            message this chooser sees.
        @param reserved: gives the UIDLs (other than our own) no new
            message may have: those messages of the maildrop have, and
            those of messages gone from it; called once, when first needed.
        @param xuidl: whether an C{X-UIDL} field is a candidate
            (L{xuidl_reused}).
        @param held: on a full rescan, the UIDLs (other than our own) of
            the earlier index's messages.  One whose message is found again
            stays with it (L{keep}); one whose message is not is that of a
            message another program rewrote, and free for a new message
            whose candidate it is.  Which it is is known only at the end of
            the scan, so a message that would claim one waits till then
            (L{must_wait}).
        """
        self._fmt = fmt
        self.sequence = sequence
        self._reserved = reserved
        self._xuidl = xuidl
        self._held = held
        self._taken: set[bytes] | None = None

    @property
    def wants_md5(self) -> bool:
        """Whether the scan must compute header MD5s for the format."""
        return self._fmt is not None and bool(self._fmt.needs & {"m", "g"})

    def _variables(self, meta: MessageMeta | None, uid: int | None) -> dict[str, str | int]:
        values: dict[str, str | int] = {}
        if uid is not None:
            values["u"] = uid
        if self.sequence.uidvalidity:
            values["v"] = self.sequence.uidvalidity
        if meta is not None and meta.header_md5 is not None:
            values["m"] = values["g"] = meta.header_md5
        return values

    def candidates(self, meta: MessageMeta | None) -> list[bytes]:
        """
        Read the next message (not the pseudo-message) and give its
        candidate UIDLs, best first; our own is not among them.

        Every message must be read, in file order, whether or not its UIDL
        is chosen here: the UIDs of those after it depend on it.
        """
        uid = self.sequence.advance(meta)
        found: list[bytes] = []
        if self._xuidl and meta is not None and meta.uidl is not None:
            if is_valid_uidl(meta.uidl):
                found.append(meta.uidl)
        if self._fmt is not None:
            values = self._variables(meta, uid)
            if self._fmt.needs <= values.keys():
                try:
                    found.append(self._fmt.render(values))
                except ValueError:
                    pass
        return [c for c in found if not looks_own(c)]

    def _claimed(self) -> set[bytes]:
        if self._taken is None:
            self._taken = set(self._reserved())
        return self._taken

    def taken(self, uidl: bytes) -> bool:
        """
        Whether C{uidl} is not free for our own UIDL of a new message:
        another message has it, had it, or may have it.
        """
        return uidl in self._claimed() or uidl in self._held

    def keep(self, uidl: bytes) -> None:
        """A message found again keeps C{uidl}, one of those held."""
        self._claimed().add(uidl)

    def must_wait(self, candidates: Iterable[bytes]) -> bool:
        """
        Whether the first of C{candidates} that is free may be one held for
        a message of the earlier index that may yet be found again: then
        only the end of the scan tells whether it is free.
        """
        claimed = self._claimed()
        for uidl in candidates:
            if uidl not in claimed:
                return uidl in self._held
        return False

    def claim(self, candidates: Iterable[bytes]) -> bytes | None:
        """
        The first candidate no other message has, had or keeps, now taken;
        L{None} if none is free (the message gets our own).  A held one is
        free: call this during a scan only if L{must_wait} says no, and at
        its end for the messages that waited.
        """
        claimed = self._claimed()
        for uidl in candidates:
            if uidl not in claimed:
                claimed.add(uidl)
                return uidl
        return None

    def unclaimed_held(self) -> list[bytes]:
        """
        The held UIDLs that no message kept or claimed, in their order: at
        the end of a scan, those of messages gone from the file.
        """
        claimed = self._claimed()
        return [uidl for uidl in self._held if uidl not in claimed]


def check_uidl(uidl: bytes) -> None:
    """
    Raise C{ValueError} unless C{uidl} may be sent as a unique-id.
    """
    if not is_valid_uidl(uidl):
        raise ValueError(f"{uidl!r} is not a valid UIDL (1 to 70 characters from ! to ~)")
