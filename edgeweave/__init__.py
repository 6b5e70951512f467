"""edgeweave: run one model across several small devices on a LAN."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgeweave")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+src"

SERVICE_TYPE = "_edgeweave._tcp.local."
