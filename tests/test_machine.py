"""Tests for L{pop3srv.core.machine}, the sans-IO session."""

from __future__ import annotations

from collections.abc import Callable

from helpers import b64
from hypothesis import given
from hypothesis import strategies as st

from pop3srv.core import machine as m
from pop3srv.core import sasl, scram

COMMAND_LINES = {
    "USER": b"USER alice",
    "PASS": b"PASS pw",
    "APOP": b"APOP alice 0123456789abcdef",
    "STAT": b"STAT",
    "LIST": b"LIST",
    "RETR": b"RETR 1",
    "DELE": b"DELE 1",
    "NOOP": b"NOOP",
    "RSET": b"RSET",
    "QUIT": b"QUIT",
    "AUTH": b"AUTH",
    "UTF8": b"UTF8",
    "TOP": b"TOP 1 0",
    "UIDL": b"UIDL",
    "CAPA": b"CAPA",
}


def machine_in(state: m.State) -> m.Pop3Machine:
    """A machine brought to C{state} through its public API."""
    machine = m.Pop3Machine(m.Capabilities(apop_challenge="<1.2@host>"))
    if state in (m.State.TRANSACTION, m.State.UPDATE):
        machine.receive_data(b"USER alice\r\nPASS pw\r\n")
        assert machine.next_action() == m.Reply(b"+OK Send PASS.\r\n")
        assert isinstance(machine.next_action(), m.Authenticate)
        machine.login_succeeded("alice", [10, 20], lambda i: f"uid{i}")
    if state is m.State.UPDATE:
        machine.receive_data(b"QUIT\r\n")
        assert machine.next_action() == m.Commit(frozenset())
    if state is m.State.CLOSED:
        machine.connection_lost()
    return machine


def run(machine: m.Pop3Machine, data: bytes) -> list[object]:
    """Feed C{data} and collect actions until the machine needs data."""
    machine.receive_data(data)
    actions = []
    while (action := machine.next_action()) is not m.NEED_DATA:
        actions.append(action)
        if isinstance(action, m.Authenticate):
            break
    return actions


@given(st.sampled_from(list(m.State)), st.sampled_from(sorted(COMMAND_LINES)))
def test_every_state_and_command(state: m.State, keyword: str) -> None:
    """A command outside its state's table gets -ERR; inside, some other action."""
    machine = machine_in(state)
    actions = run(machine, COMMAND_LINES[keyword] + b"\r\n")
    if state in (m.State.UPDATE, m.State.CLOSED):
        assert actions == []
        return
    (action,) = actions
    legal = any(cls.__name__.upper() == keyword for cls in m.ALLOWED[state])
    refused = action == m.Reply(b"-ERR Command not valid in this state.\r\n")
    assert refused is not legal


def test_transaction_commands_refused_before_login() -> None:
    """No TRANSACTION command runs in AUTHORIZATION."""
    machine = machine_in(m.State.AUTHORIZATION)
    for keyword in ("STAT", "LIST", "RETR", "DELE", "RSET", "TOP", "UIDL"):
        assert run(machine, COMMAND_LINES[keyword] + b"\r\n") == [
            m.Reply(b"-ERR Command not valid in this state.\r\n")
        ]
    assert machine.state is m.State.AUTHORIZATION


def test_noop_only_in_transaction() -> None:
    """RFC 1939 section 5: NOOP is a TRANSACTION command; before login it is refused."""
    machine = machine_in(m.State.AUTHORIZATION)
    assert run(machine, b"NOOP\r\n") == [m.Reply(b"-ERR Command not valid in this state.\r\n")]
    assert machine.bad_commands == 1
    machine = machine_in(m.State.TRANSACTION)
    assert run(machine, b"NOOP\r\n") == [m.Reply(b"+OK\r\n")]


def capa_lines(machine: m.Pop3Machine) -> list[bytes]:
    """The capability lines a CAPA gets from C{machine}."""
    (reply,) = run(machine, b"CAPA\r\n")
    assert isinstance(reply, m.Reply)
    return reply.data.split(b"\r\n")[1:-2]


def test_capa_offers_stls_only_before_login() -> None:
    """
    RFC 2595 section 4: STLS is an AUTHORIZATION command, so CAPA after a
    plaintext login (USER/PASS or SASL) lists everything but STLS.
    """
    plain = b"AUTH PLAIN " + b64("\0alice\0pw").encode() + b"\r\n"
    for login in (b"USER alice\r\nPASS pw\r\n", plain):
        machine = m.Pop3Machine(
            m.Capabilities(stls=True, sasl=(sasl.PLAIN,)),
            start_sasl=lambda: sasl.SASLServer(
                mechanisms=(sasl.PLAIN,), tls_active=False, plaintext_allowed=True
            ),
        )
        before = capa_lines(machine)
        assert b"STLS" in before
        action = run(machine, login)[-1]
        if isinstance(action, m.SaslVerify):
            assert machine.sasl_verified("alice", [1], str) == m.Reply(
                b"+OK Maildrop has 1 messages (1 octets).\r\n"
            )
        else:
            assert isinstance(action, m.Authenticate)
            machine.login_succeeded("alice", [1], str)
        assert machine.state is m.State.TRANSACTION
        assert capa_lines(machine) == [line for line in before if line != b"STLS"]


def test_pass_needs_user_and_auth_failure_keeps_session() -> None:
    """PASS without USER is refused; a failed login leaves AUTHORIZATION usable."""
    machine = machine_in(m.State.AUTHORIZATION)
    assert run(machine, b"PASS x\r\n") == [m.Reply(b"-ERR Send USER first.\r\n")]
    assert run(machine, b"USER bob\r\nPASS x y\r\n")[1] == m.Authenticate("bob", password="x y")
    assert machine.next_action() is m.NEED_DATA
    assert machine.login_failed("AUTH") == b"-ERR [AUTH] Invalid username or password.\r\n"
    assert run(machine, b"PASS again\r\n") == [m.Reply(b"-ERR Send USER first.\r\n")]


def test_pipelined_commands_wait_for_authentication() -> None:
    """Commands sent with PASS are answered only after the login completes, in order."""
    machine = machine_in(m.State.AUTHORIZATION)
    actions = run(machine, b"USER a\r\nPASS b\r\nSTAT\r\nLIST\r\n")
    assert [type(a) for a in actions] == [m.Reply, m.Authenticate]
    assert machine.next_action() is m.NEED_DATA
    machine.login_succeeded("a", [5], lambda i: "u")
    assert run(machine, b"") == [
        m.Reply(b"+OK 1 5\r\n"),
        m.Reply(b"+OK 1 messages.\r\n1 5\r\n.\r\n"),
    ]


def test_transaction_flow() -> None:
    """STAT/LIST/UIDL/DELE/RSET/RETR/TOP answer from the maildrop view."""
    machine = machine_in(m.State.TRANSACTION)
    assert run(machine, b"STAT\r\n") == [m.Reply(b"+OK 2 30\r\n")]
    assert run(machine, b"UIDL 2\r\n") == [m.Reply(b"+OK 2 uid1\r\n")]
    assert run(machine, b"DELE 1\r\n") == [m.Reply(b"+OK Message 1 deleted.\r\n")]
    assert (
        run(machine, b"DELE 1\r\nRETR 1\r\nLIST 1\r\n")
        == [m.Reply(b"-ERR Message 1 is deleted.\r\n")] * 3
    )
    assert run(machine, b"STAT\r\nLIST\r\nUIDL\r\n") == [
        m.Reply(b"+OK 1 20\r\n"),
        m.Reply(b"+OK 1 messages.\r\n2 20\r\n.\r\n"),
        m.Reply(b"+OK 1 messages.\r\n2 uid1\r\n.\r\n"),
    ]
    assert run(machine, b"RETR 3\r\nRETR 0\r\n") == [m.Reply(b"-ERR No such message.\r\n")] * 2
    assert run(machine, b"RSET\r\n") == [m.Reply(b"+OK Maildrop has 2 messages.\r\n")]
    assert run(machine, b"RETR 1\r\nTOP 2 3\r\n") == [
        m.SendMessage(0, None, b"+OK 10 octets.\r\n"),
        m.SendMessage(1, 3, b"+OK Top of message follows.\r\n"),
    ]
    # The marks are the machine's alone; QUIT hands over those RSET left.
    assert run(machine, b"DELE 1\r\nRSET\r\nDELE 2\r\nQUIT\r\n") == [
        m.Reply(b"+OK Message 1 deleted.\r\n"),
        m.Reply(b"+OK Maildrop has 2 messages.\r\n"),
        m.Reply(b"+OK Message 2 deleted.\r\n"),
        m.Commit(frozenset({1})),
    ]


def test_quit_commits_only_in_transaction() -> None:
    """QUIT in AUTHORIZATION closes; in TRANSACTION it asks for a commit."""
    machine = machine_in(m.State.AUTHORIZATION)
    assert run(machine, b"QUIT\r\n") == [m.Close(b"+OK Bye.\r\n")]
    machine = machine_in(m.State.TRANSACTION)
    run(machine, b"DELE 2\r\n")
    assert run(machine, b"QUIT\r\nSTAT\r\n") == [m.Commit(frozenset({1}))]
    assert machine.commit_succeeded() == b"+OK Bye, 1 messages deleted.\r\n"
    assert machine.state is m.State.CLOSED


@given(st.lists(st.sampled_from([b"DELE 1", b"DELE 2", b"DELE 3", b"RSET"]), max_size=8))
def test_quit_commits_exactly_the_marks_left(lines: list[bytes]) -> None:
    """
    Whatever mix of DELE and RSET came before, QUIT commits the 0-based
    indexes of the messages deleted since the last RSET, and nothing else.
    """
    machine = machine_in(m.State.TRANSACTION)
    marked: set[int] = set()
    for line in lines:
        run(machine, line + b"\r\n")
        if line == b"RSET":
            marked.clear()
        elif int(line.split()[1]) <= 2:
            marked.add(int(line.split()[1]) - 1)
    assert run(machine, b"QUIT\r\n") == [m.Commit(frozenset(marked))]
    assert machine.commit_succeeded() == f"+OK Bye, {len(marked)} messages deleted.\r\n".encode()


def test_capa_and_greeting() -> None:
    """CAPA lists the RFC 2449 capabilities; APOP's timestamp only when offered."""
    machine = m.Pop3Machine(m.Capabilities(expire="NEVER", login_delay=30))
    assert machine.greeting() == b"+OK POP3 server ready.\r\n"
    (reply,) = run(machine, b"CAPA\r\n")
    assert isinstance(reply, m.Reply)
    assert reply.data.split(b"\r\n")[1:-2] == [
        b"TOP",
        b"USER",
        b"UIDL",
        b"PIPELINING",
        b"RESP-CODES",
        b"AUTH-RESP-CODE",
        b"EXPIRE NEVER",
        b"LOGIN-DELAY 30",
        b"UTF8",
        b"IMPLEMENTATION pop3srv",
    ]
    assert run(machine, b"APOP a b\r\n") == [m.Reply(b"-ERR APOP is not available.\r\n")]
    with_apop = m.Pop3Machine(m.Capabilities(apop_challenge="<1.2@h>"))
    assert with_apop.greeting() == b"+OK POP3 server ready. <1.2@h>\r\n"


def test_bad_commands_are_counted_and_reset() -> None:
    """Consecutive bad commands are counted; a good one resets the count."""
    machine = machine_in(m.State.AUTHORIZATION)
    run(machine, b"FOO\r\nBAR\r\n" + b"x" * 400 + b"\r\n")
    assert machine.bad_commands == 3
    run(machine, b"CAPA\r\n")
    assert machine.bad_commands == 0


def test_uidls_given_as_bytes_are_sent_as_text() -> None:
    """Twisted's IMailbox returns UIDLs as bytes; they go on the wire unchanged."""
    machine = m.Pop3Machine()
    run(machine, b"USER a\r\nPASS b\r\n")
    machine.login_succeeded("a", [1], lambda i: b"0123abcd.1")
    assert run(machine, b"UIDL\r\nUIDL 1\r\n") == [
        m.Reply(b"+OK 1 messages.\r\n1 0123abcd.1\r\n.\r\n"),
        m.Reply(b"+OK 1 0123abcd.1\r\n"),
    ]


# --- SASL through the machine


def sasl_machine(authorize: Callable[[str, str], bool] | None = None) -> m.Pop3Machine:
    """A machine offering PLAIN, LOGIN and SCRAM-SHA-256 on a trusted connection."""
    mechanisms = (sasl.SCRAM_SHA_256, sasl.PLAIN, sasl.LOGIN)

    def start() -> sasl.SASLServer:
        return sasl.SASLServer(
            mechanisms=mechanisms,
            tls_active=False,
            plaintext_allowed=True,
            authorize=authorize,
            nonce_factory=lambda: "server-nonce",
        )

    return m.Pop3Machine(m.Capabilities(sasl=mechanisms), start_sasl=start)


def test_sasl_plain_to_transaction() -> None:
    """
    AUTH PLAIN with an initial response asks to verify plain data (no
    Twisted types), waits meanwhile, and enters TRANSACTION on success.
    """
    machine = sasl_machine()
    machine.receive_data(b"AUTH PLAIN " + b64("\0alice\0pw").encode() + b"\r\nSTAT\r\n")
    action = machine.next_action()
    assert isinstance(action, m.SaslVerify)
    request = action.request
    assert (request.mechanism, request.username, request.authzid) == ("PLAIN", "alice", None)
    assert request.password == "pw" and request.proof is None
    assert "pw" not in repr(request).replace("PLAIN", "")
    assert machine.next_action() is m.NEED_DATA
    reply = machine.sasl_verified("alice", [3], lambda i: "u")
    assert reply == m.Reply(b"+OK Maildrop has 1 messages (3 octets).\r\n")
    assert machine.state is m.State.TRANSACTION and machine.username == "alice"
    assert machine.next_action() == m.Reply(b"+OK 1 3\r\n")


def test_sasl_login_failure_stays_in_authorization() -> None:
    """
    LOGIN prompts twice; a refused login ends the exchange, counts as a bad
    command, and the next command is parsed as a command again.
    """
    machine = sasl_machine()
    assert run(machine, b"AUTH LOGIN\r\n") == [m.Reply(b"+ VXNlcm5hbWU6\r\n")]
    assert run(machine, b64("alice").encode() + b"\r\n") == [m.Reply(b"+ UGFzc3dvcmQ6\r\n")]
    machine.receive_data(b64("wrong").encode() + b"\r\n")
    action = machine.next_action()
    assert isinstance(action, m.SaslVerify) and action.request.password == "wrong"
    assert machine.login_failed("AUTH") == b"-ERR [AUTH] Invalid username or password.\r\n"
    assert machine.state is m.State.AUTHORIZATION and machine.bad_commands == 1
    # Parsed as a command, not as a SASL response (and NOOP is a TRANSACTION command).
    assert run(machine, b"NOOP\r\n") == [m.Reply(b"-ERR Command not valid in this state.\r\n")]


def test_sasl_scram_lookup_verify_and_abort() -> None:
    """
    SCRAM asks for a lookup, then a verify with a plain proof; after the
    server-final challenge a cancel aborts the login (the caller releases
    the maildrop) instead of entering TRANSACTION.
    """
    salt = b"s" * 16
    stored = scram.stored_from_salted(salt, 4096, scram.salted_password(b"pw", salt, 4096))
    machine = sasl_machine()
    machine.receive_data(b"AUTH SCRAM-SHA-256 " + b64("n,,n=alice,r=cnonce").encode() + b"\r\n")
    assert machine.next_action() == m.SaslLookup("alice")
    assert machine.next_action() is m.NEED_DATA
    challenge = machine.sasl_lookup_done(stored)
    assert isinstance(challenge, m.Reply) and challenge.data.startswith(b"+ ")
    # A wrong proof of the right length: the machine does not judge it.
    final = f"c=biws,r=cnonceserver-nonce,p={'A' * 43}="
    machine.receive_data(b64(final).encode() + b"\r\n")
    action = machine.next_action()
    assert isinstance(action, m.SaslVerify)
    assert action.request.proof is not None and action.request.password is None
    assert not action.request.proof.check(stored)
    server_final = machine.sasl_verified("alice", [], lambda i: "u")
    assert isinstance(server_final, m.Reply) and server_final.data.startswith(b"+ ")
    assert run(machine, b"*\r\n") == [m.AbortLogin(b"-ERR Authentication cancelled.\r\n")]
    assert machine.state is m.State.AUTHORIZATION


def test_sasl_authzid_reaches_the_verify_step() -> None:
    """
    An authzid passes the early filter only if it allows it; then the
    verify step names it, for the checker to resolve.
    """
    machine = sasl_machine()
    (refused,) = run(machine, b"AUTH PLAIN " + b64("bob\0admin\0pw").encode() + b"\r\n")
    # Refused before any password check, but counted and audited by the
    # caller first (SaslRefused), then answered with the same reply.
    assert isinstance(refused, m.SaslRefused)
    assert (refused.failure.reason, refused.failure.username) == ("authzid-refused", "admin")
    assert (
        machine.login_failed(refused.failure.code or "AUTH", refused.failure.text)
        == b"-ERR [AUTH] Authentication failed.\r\n"
    )
    assert machine.state is m.State.AUTHORIZATION
    machine = sasl_machine(authorize=lambda c, z: c == "admin")
    machine.receive_data(b"AUTH PLAIN " + b64("bob\0admin\0pw").encode() + b"\r\n")
    action = machine.next_action()
    assert isinstance(action, m.SaslVerify)
    assert (action.request.username, action.request.authzid) == ("admin", "bob")
