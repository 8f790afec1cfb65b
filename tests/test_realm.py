"""
Tests for L{pop3srv.auth.realm}: avatar IDs become mbox maildrops through the
path template, names that could leave the mail directory are refused, and
logging out releases the maildrop.

Real mbox files in a temporary directory; blocking work runs at once through
L{helpers.run_now}, so every Deferred has fired when C{requestAvatar} returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import failure_of, result_of, run_now
from livepop3 import write_mbox
from twisted.cred.portal import IRealm
from twisted.mail.pop3 import IMailbox
from zope.interface.verify import verifyObject

from pop3srv.auth.realm import MboxRealm, check_mailbox_template
from pop3srv.core.errors import InvalidUsername, MaildropInUse

MESSAGES = [b"Subject: one\n\nfirst\n", b"Subject: two\n\nsecond\n"]


@pytest.fixture
def mail(tmp_path: Path) -> Path:
    """A mail directory where alice has two messages and bob has no mbox yet."""
    directory = tmp_path / "mail"
    directory.mkdir()
    write_mbox(directory / "alice", MESSAGES)
    return directory


@pytest.fixture
def realm(mail: Path, tmp_path: Path) -> MboxRealm:
    """A realm for C{mail/{user}} with its indexes in their own directory."""
    index = tmp_path / "index"
    index.mkdir()
    return MboxRealm(f"{mail}/{{user}}", index_dir=str(index), defer_to_thread=run_now)


def login(realm: MboxRealm, avatar_id: Any = b"alice") -> tuple[Any, Any, Any]:
    """The avatar triple for C{avatar_id}, asking for IMailbox."""
    return result_of(realm.requestAvatar(avatar_id, None, IMailbox))


def test_provides_irealm(realm: MboxRealm) -> None:
    """The realm is a cred IRealm."""
    assert verifyObject(IRealm, realm)


def test_avatar_is_the_users_mbox(realm: MboxRealm) -> None:
    """alice gets an IMailbox over her mbox: its messages, in order, and a logout."""
    interface, mailbox, logout = login(realm)
    try:
        assert interface is IMailbox
        assert IMailbox.providedBy(mailbox)
        assert len(mailbox.listMessages()) == len(MESSAGES)
        assert b"second" in mailbox.getMessage(1).read()
        assert callable(logout)
    finally:
        logout()


def test_missing_mbox_is_empty(realm: MboxRealm) -> None:
    """A user without an mbox file has an empty maildrop, not an error."""
    _, mailbox, logout = login(realm, b"bob")
    try:
        assert list(mailbox.listMessages()) == []
    finally:
        logout()


def test_template_maps_names_to_paths(mail: Path) -> None:
    """The username replaces C{{user}}, wherever it stands in the template."""
    realm = MboxRealm(f"{mail}/{{user}}/inbox", defer_to_thread=run_now)
    assert realm.mailbox_path("alice") == f"{mail}/alice/inbox"
    assert realm.mailbox_path("jöe@example.org") == f"{mail}/jöe@example.org/inbox"
    assert MboxRealm(defer_to_thread=run_now).mailbox_path("carol") == "/var/mail/carol"


def test_utf8_avatar_id(realm: MboxRealm, mail: Path) -> None:
    """An avatar ID is UTF-8: a non-ASCII name opens the mbox of that name."""
    write_mbox(mail / "jöe", [b"Subject: hi\n\nfor j\xc3\xb6e\n"])
    _, mailbox, logout = login(realm, "jöe".encode())
    try:
        assert len(mailbox.listMessages()) == 1
    finally:
        logout()


BAD_NAMES = ["", ".", "..", "../alice", "a/b", "x..y", "a:b", "a b", "tab\t", "#alice"]
BAD_NAMES += ["nul\x00", "bidi\u202e", "x" * 256]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_refused(realm: MboxRealm, name: str) -> None:
    """
    A name that could leave the mail directory, or confuse a log, is
    L{InvalidUsername} both from C{mailbox_path} and from C{requestAvatar}.
    """
    with pytest.raises(InvalidUsername):
        realm.mailbox_path(name)
    failure_of(realm.requestAvatar(name.encode(), None, IMailbox), InvalidUsername)


def test_invalid_utf8_refused(realm: MboxRealm) -> None:
    """An avatar ID that is not UTF-8 names no maildrop."""
    failure_of(realm.requestAvatar(b"\xffalice", None, IMailbox), InvalidUsername)


def test_anonymous_refused(realm: MboxRealm) -> None:
    """The anonymous avatar ID (an empty tuple) has no maildrop."""
    failure_of(realm.requestAvatar((), None, IMailbox), InvalidUsername)


def test_other_interfaces_refused(realm: MboxRealm) -> None:
    """A request for anything but IMailbox fails with NotImplementedError."""
    failure_of(realm.requestAvatar(b"alice", None, IRealm), NotImplementedError)
    failure_of(realm.requestAvatar(b"alice", None), NotImplementedError)


def test_second_session_in_use_until_logout(realm: MboxRealm) -> None:
    """
    While one session holds a maildrop, another is refused with
    L{MaildropInUse}; logging out releases it for the next session.
    """
    _, _, logout = login(realm)
    failure_of(realm.requestAvatar(b"alice", None, IMailbox), MaildropInUse)
    _, _, other_user_logout = login(realm, b"bob")
    other_user_logout()
    logout()
    _, mailbox, again = login(realm)
    try:
        assert len(mailbox.listMessages()) == len(MESSAGES)
    finally:
        again()


def test_logout_twice_is_harmless(realm: MboxRealm) -> None:
    """A second logout (a connection lost after QUIT) does nothing."""
    _, _, logout = login(realm)
    logout()
    logout()
    _, _, again = login(realm)
    again()


def test_blocking_work_goes_through_defer_to_thread(mail: Path) -> None:
    """Opening the maildrop runs in the injected C{defer_to_thread}, not inline."""
    calls: list[str] = []

    def recording(f: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(getattr(f, "__name__", repr(f)))
        return run_now(f, *args, **kwargs)

    realm = MboxRealm(f"{mail}/{{user}}", defer_to_thread=recording)
    _, _, logout = result_of(realm.requestAvatar(b"alice", None, IMailbox))
    logout()
    assert calls and calls[0] == "open_maildrop"


@pytest.mark.parametrize(
    ("template", "complaint"),
    [
        ("/var/mail/", "must contain {user}"),
        ("var/mail/{user}", "must be an absolute path"),
        ("/var/mail/{user}/{domain}", "may use no field but {user}"),
        ("/var/mail/{user}}", "may use no field but {user}"),
        ("/var/{mail/{user}", "may use no field but {user}"),
    ],
)
def test_check_mailbox_template(template: str, complaint: str) -> None:
    """A template without {user}, with other fields, or relative, is a ValueError naming it."""
    with pytest.raises(ValueError, match=complaint) as info:
        check_mailbox_template(template)
    assert repr(template) in str(info.value)
    with pytest.raises(ValueError, match=complaint):
        MboxRealm(template)


@pytest.mark.parametrize("template", ["/var/mail/{user}", "/srv/{user}/mbox", "/m/{user}-{user}"])
def test_good_templates_accepted(template: str) -> None:
    """Absolute templates with only {user} fields pass."""
    check_mailbox_template(template)
