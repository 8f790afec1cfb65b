# -*- test-case-name: tests.test_realm -*-
"""
The cred realm: maps an authenticated avatar ID to its maildrop, an mbox
file or a Maildir.

The avatar ID comes from a checker, already normalised (an
L{pop3srv.auth.credentials.AvatarId} names the maildrop owner in NFC); the
realm only checks that it is safe as a path component, since any checker may
sit in front of it, and hands it back on the logout callable
(L{AvatarLogout}) so the caller learns whose maildrop opened and which
password matched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.cred.portal import IRealm
from twisted.internet import defer
from twisted.mail.pop3 import IMailbox
from zope.interface import implementer

from pop3srv.auth.credentials import AvatarId, AvatarLogout
from pop3srv.auth.identity import validate_username
from pop3srv.core.errors import InvalidUsername
from pop3srv.maildir import open_maildir
from pop3srv.mbox import open_maildrop
from pop3srv.mbox.paths import template_prefix
from pop3srv.mbox.uidlformat import UidlFormat

USER_FIELD = "{user}"

#: The maildrop formats a mailbox template may name: C{maildir:/path}, or
#: a plain path (or C{mbox:/path}) for an mbox file.
MAILDROP_KINDS = ("mbox", "maildir")

#: Why a C{maildir:} template takes no UIDL format.
MAILDIR_UIDL_FORMAT = (
    "--uidl-format applies to mbox; a Maildir's UIDLs are its file names (Dovecot's %f)"
)


def split_mailbox_template(template: str) -> tuple[str, str]:
    """
    The maildrop format a mailbox template names and its path template:
    C{maildir:/home/{user}/Maildir} is C{("maildir", "/home/{user}/Maildir")},
    C{/var/mail/{user}} (or C{mbox:/var/mail/{user}}) is an mbox.
    """
    kind, sep, rest = template.partition(":")
    if sep and kind in MAILDROP_KINDS:
        return kind, rest
    return "mbox", template


def check_mailbox_template(template: str) -> None:
    """
    Raise C{ValueError} unless C{template} is an absolute path, after an
    optional C{maildir:} or C{mbox:}, that contains C{{user}} exactly where
    the username goes (and no other braces).
    """
    _, template = split_mailbox_template(template)
    if USER_FIELD not in template:
        raise ValueError(f"mailbox template {template!r} must contain {USER_FIELD}")
    if "{" in template.replace(USER_FIELD, "") or "}" in template.replace(USER_FIELD, ""):
        raise ValueError(f"mailbox template {template!r} may use no field but {USER_FIELD}")
    if not template.startswith("/"):
        raise ValueError(f"mailbox template {template!r} must be an absolute path")


@implementer(IRealm)
class MboxRealm:
    """
    Gives each user the maildrop named by a path template: an mbox file,
    or a Maildir (L{pop3srv.maildir}) if the template says C{maildir:}.

    @param template: the mbox path with C{{user}} for the username, such as
        C{/var/mail/{user}}, or C{maildir:} and the Maildir's path, such as
        C{maildir:/home/{user}/Maildir}.  The directory before the first
        C{{user}} is the admin's and may hold symlinks; below it the
        maildrop is reached without following any, so a user cannot point a
        directory of theirs at another user's mail.
    @param index_dir: where UIDL indexes live; beside each mbox if C{None}.
    @param defer_to_thread: runs blocking work off the reactor thread.
    @param uidl_format: Dovecot's C{pop3_uidl_format} for the UIDLs of
        messages first indexed from now on (L{pop3srv.mbox.pins}); C{None}
        for our own.  C{ValueError} if it is not one, or if the template
        is a Maildir's (L{MAILDIR_UIDL_FORMAT}).
    @param reuse_xuidl: whether an C{X-UIDL} field gives a newly indexed
        mbox message its UIDL; C{None} for yes unless C{uidl_format} is
        given (L{pop3srv.mbox.pins.xuidl_reused}).
    @ivar uidl_format: the parsed format, or C{None}.
    @ivar kind: C{"mbox"} or C{"maildir"} (L{split_mailbox_template}).
    @ivar path_template: the template without its C{maildir:} prefix.
    """

    def __init__(
        self,
        template: str = "/var/mail/{user}",
        index_dir: str | None = None,
        defer_to_thread: Callable[..., defer.Deferred[Any]] | None = None,
        uidl_format: str | None = None,
        reuse_xuidl: bool | None = None,
    ) -> None:
        check_mailbox_template(template)
        self.reuse_xuidl = reuse_xuidl
        if uidl_format is not None and split_mailbox_template(template)[0] == "maildir":
            raise ValueError(MAILDIR_UIDL_FORMAT)
        self.uidl_format = UidlFormat.parse(uidl_format) if uidl_format is not None else None
        if defer_to_thread is None:
            from twisted.internet.threads import deferToThread

            defer_to_thread = deferToThread
        self.template = template
        self.kind, self.path_template = split_mailbox_template(template)
        self.trusted_root = template_prefix(self.path_template, USER_FIELD)
        self.index_dir = index_dir
        self._defer_to_thread = defer_to_thread

    def mailbox_path(self, username: str) -> str:
        """
        The maildrop path for C{username}; raises L{InvalidUsername} for a
        name that could leave the template's directory or confuse a log.
        """
        try:
            validate_username(username)
        except ValueError as e:
            raise InvalidUsername(str(e)) from None
        return self.path_template.replace(USER_FIELD, username)

    def requestAvatar(
        self, avatarId: bytes | tuple[()], mind: object, *interfaces: Any
    ) -> defer.Deferred[tuple[Any, Any, Callable[[], None]]]:
        if IMailbox not in interfaces:
            return defer.fail(NotImplementedError("MboxRealm only provides IMailbox"))
        if not isinstance(avatarId, bytes):
            return defer.fail(InvalidUsername("anonymous login has no maildrop"))
        avatar_id = AvatarId.of(avatarId)
        try:
            username = avatarId.decode("utf-8")
            path = self.mailbox_path(username)
        except (UnicodeDecodeError, InvalidUsername) as e:
            return defer.fail(InvalidUsername(str(e)))
        if self.kind == "maildir":
            opened: defer.Deferred[Any] = self._defer_to_thread(
                open_maildir,
                path,
                index_dir=self.index_dir,
                defer_to_thread=self._defer_to_thread,
                trusted_root=self.trusted_root,
            )
            opened.addCallback(
                lambda mailbox: (IMailbox, mailbox, AvatarLogout(avatar_id, mailbox.close))
            )
            return opened
        d: defer.Deferred[Any] = self._defer_to_thread(
            open_maildrop,
            path,
            index_dir=self.index_dir,
            defer_to_thread=self._defer_to_thread,
            trusted_root=self.trusted_root,
            uidl_format=self.uidl_format,
            reuse_xuidl=self.reuse_xuidl,
        )
        d.addCallback(lambda mailbox: (IMailbox, mailbox, AvatarLogout(avatar_id, mailbox.close)))
        return d
