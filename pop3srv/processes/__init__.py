"""
Processes: the supervisor of server processes and the hashing processes.
"""
