"""rdmaproxy: a SOCKS proxy that carries TCP streams between nodes over RDMA."""

__version__ = "0.1.0"
