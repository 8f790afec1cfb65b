# -*- test-case-name: tests.test_integration -*-
"""
Create the demo area that C{make run} serves: a user file with user C{demo}
(password C{demo}), an mbox with a few messages, and a self-signed
certificate for localhost.  Existing files are left alone, so the demo
mailbox keeps its state between runs.
"""

from __future__ import annotations

import email.utils
import os
import sys
import time

DEMO_USER = "demo"
DEMO_PASSWORD = "demo"  # noqa: S105 -- documented in the README; loopback only

_MESSAGES = [
    ("Welcome to pop3srv", "This is the demo maildrop.\nDelete me with DELE 1, then QUIT.\n"),
    ("A line with a dot", "The next line starts with a dot:\n.hidden? no, stuffed.\n"),
    ("From lines", "The next line is quoted in the mbox file:\nFrom here on, all is well.\n"),
]


def _mbox_text() -> str:
    parts = []
    for number, (subject, body) in enumerate(_MESSAGES, start=1):
        date = email.utils.formatdate(time.time() - 3600 * (len(_MESSAGES) - number))
        quoted = "".join(
            ">" + line if line.lstrip(">").startswith("From ") else line
            for line in body.splitlines(keepends=True)
        )
        parts.append(
            f"From demo-sender@example.org {time.asctime()}\n"
            f"From: Demo Sender <demo-sender@example.org>\n"
            f"To: {DEMO_USER}@localhost\n"
            f"Subject: {subject}\n"
            f"Date: {date}\n"
            f"Message-ID: <demo-{number}@pop3srv.invalid>\n"
            f"\n{quoted}\n"
        )
    return "".join(parts)


def create_self_signed(cert_path: str, key_path: str) -> None:
    """Write a self-signed certificate for localhost and 127.0.0.1 and its key."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def create_demo(directory: str) -> None:
    """Create the demo user file, mbox and certificate in C{directory} if missing."""
    from pop3srv.auth.hashpolicy import hash_password

    os.makedirs(os.path.join(directory, "mail"), exist_ok=True)
    users = os.path.join(directory, "users")
    if not os.path.exists(users):
        with open(users, "w", encoding="utf-8") as f:
            f.write("# pop3srv demo users: name:hash (password of 'demo' is 'demo')\n")
            f.write(f"{DEMO_USER}:{hash_password(DEMO_PASSWORD)}\n")
    cert, key = os.path.join(directory, "tls.crt"), os.path.join(directory, "tls.key")
    if not (os.path.exists(cert) and os.path.exists(key)):
        create_self_signed(cert, key)
    mbox = os.path.join(directory, "mail", DEMO_USER)
    if not os.path.exists(mbox):
        with open(mbox, "w", encoding="utf-8") as f:
            f.write(_mbox_text())


def main(argv: list[str] | None = None) -> int:
    """C{python -m pop3srv.admin.demo DIRECTORY}."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pop3srv.admin.demo DIRECTORY", file=sys.stderr)
        return 2
    create_demo(args[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
