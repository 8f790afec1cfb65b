"""
The Twisted server: the protocol, the login service, TLS, limits and audit.
"""
