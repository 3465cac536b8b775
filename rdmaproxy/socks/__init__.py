"""SOCKS front end: sans-I/O codec and trio server."""
