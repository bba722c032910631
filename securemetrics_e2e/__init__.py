"""securemetrics-e2e: prove that Prometheus scrapes Istio proxies over mutual TLS.

The package holds the library (PKI, probes, Prometheus client, backends), the pytest
plugin that runs the conformance scenarios, and the command-line interface.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("securemetrics-e2e")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
