# -*- test-case-name: tests.test_userfile -*-
"""
Identity rules: what a user name and an app-password label may be, and the
one normalisation of user names (RFC 6856 asks for one rule).

Pure Python on purpose: the realm checks names with L{validate_username}
too, so a name that the user file accepts can never escape the mail
directory, and importing these rules loads neither passlib nor Twisted.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["normalise_username", "validate_label", "validate_username"]

_LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")

_MAX_USERNAME_OCTETS = 255

#: What a maildrop name must not look like, so that C{/var/mail/{user}} can
#: never be another user's session lock (C{.bob.pop3srv-lock}), index,
#: journal, dotlock (C{bob.lock}) or temporary dotlock (C{.bob.lock.<hex>}).
#: Case-blind, for case-insensitive file systems.
_STATE_FILE_NAME = re.compile(r"^\.|\.lock$|\.pop3srv-", re.IGNORECASE)


def normalise_username(name: str) -> str:
    """
    Normalise a user name (RFC 6856 asks for one rule): Unicode NFC, so a
    name typed with combining accents finds the precomposed one in the file.
    Nothing else: SASLprep's mappings only touch characters that
    L{validate_username} refuses anyway.

    @param name: the name as sent or as written in the file.
    @return: its NFC form.
    """
    return unicodedata.normalize("NFC", name)


def validate_username(name: str) -> None:
    """
    Check that C{name} can be a user name here and a maildrop name later.

    The realm uses the same check, so a name that passes here can never
    escape the mail directory.

    @param name: the candidate user name.
    @raise ValueError: with a short reason if the name is empty, longer than
        255 octets as UTF-8, contains C{/}, C{:}, C{..}, NUL, whitespace or a
        control/format character, is C{.}, or starts with C{#} (it would read
        as a comment in the user file); or if its maildrop could be one of
        the files we keep beside another's (L{_STATE_FILE_NAME}): it starts
        with C{.}, ends in C{.lock} or contains C{.pop3srv-}.
    """
    if not name:
        raise ValueError("user name is empty")
    try:
        octets = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("user name is not valid Unicode") from None
    if octets > _MAX_USERNAME_OCTETS:
        raise ValueError(f"user name is longer than {_MAX_USERNAME_OCTETS} octets as UTF-8")
    if name == "." or ".." in name:
        raise ValueError("user name must not be '.' or contain '..'")
    if name.startswith("#"):
        raise ValueError("user name must not start with '#'")
    if _STATE_FILE_NAME.search(name):
        raise ValueError(
            "user name must not start with '.', end in '.lock' or contain '.pop3srv-' "
            "(names of the files kept beside a maildrop)"
        )
    for char in name:
        if char in "/:":
            raise ValueError(f"user name must not contain {char!r}")
        if char.isspace():
            raise ValueError("user name must not contain whitespace")
        # Cc covers NUL and the C0/C1 controls; Cf covers invisible format
        # characters (bidi overrides, zero-width joiners) that make two names
        # look alike in logs.
        if unicodedata.category(char) in ("Cc", "Cf"):
            raise ValueError("user name must not contain control characters")


def validate_label(label: str) -> None:
    """
    Check an app-password label.

    @param label: the candidate.
    @raise ValueError: unless it is 1-64 of C{A-Z a-z 0-9 . _ @ + -},
        starting with a letter or digit.
    """
    if not _LABEL_RE.fullmatch(label):
        raise ValueError(
            "app password label must be 1-64 letters, digits or . _ @ + -, "
            "starting with a letter or digit"
        )
