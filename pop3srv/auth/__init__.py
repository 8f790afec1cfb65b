"""
Authentication: the C{twisted.cred} credentials and checkers, the realm, and
the passlib user file (identity rules, hash policy, reading and editing).
"""
