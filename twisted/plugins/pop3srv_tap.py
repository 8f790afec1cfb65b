"""The C{twistd pop3srv} plugin; the module it names is imported only when used."""

from twisted.application.service import ServiceMaker

pop3srv = ServiceMaker(
    "pop3srv",
    "pop3srv.app.tap",
    "A POP3 server for mbox maildrops",
    "pop3srv",
)
