"""
The POP3 protocol core: framing, commands, the session state machine, the
SASL exchange and SCRAM maths.

Nothing in this package imports Twisted, zope.interface or passlib; it takes
bytes and plain values in and hands plain values out (a test imports it in a
fresh interpreter to keep it so).
"""
