"""
Admin commands: C{pop3srv-passwd} and the demo set-up behind C{make run}.
"""
