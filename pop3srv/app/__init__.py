"""
The C{twistd pop3srv} application: options, the TOML config and makeService.
"""
