"""The stack file's settings sections, each default and meaning written once, here.

``proxy:`` and ``watchdog:`` are read into these frozen dataclasses; the schema the stack file
is validated against (``stackfile.PROXY_FIELDS``, ``WATCHDOG_FIELDS``) and the configuration
reference (docs/configuration.md) are generated from the same fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlx_stack.loopback import is_loopback


def _doc(default: object, text: str) -> object:
    return field(default=default, metadata={"doc": text})


@dataclass(frozen=True)
class WatchSettings:
    """Timers and limits of the watchdog (the stack file's ``watchdog:`` section)."""

    probe_interval_s: float = _doc(10.0, "seconds between health probes of a ready service")
    probe_timeout_s: float = _doc(30.0, "seconds a probe may take before it counts as failed")
    failure_threshold: int = _doc(
        3, "failed probes in a row (answered, but wrong) before a broken service is restarted")
    liveness_interval_s: float = _doc(
        1.0, "seconds between liveness checks (the service's own cheap health route) of a "
        "running service")
    liveness_timeout_s: float = _doc(2.0, "seconds a liveness check may take")
    hang_after_s: float = _doc(
        6.0, "seconds without any answer, CPU time or output after which a service is hung and "
        "restarted (a stopped process: at once)")
    unresponsive_max_s: float = _doc(
        1800.0, "seconds a service may go without answering while it works (CPU, output) "
        "before it is restarted anyway")
    start_timeout_s: float = _doc(
        120.0, "seconds a start may go without progress (log output, memory growth) before it "
        "is declared failed")
    start_timeout_max_s: float = _doc(1800.0, "seconds a start may take at most, even loading")
    backoff_initial_s: float = _doc(1.0, "first delay before a restart; doubles each time")
    backoff_max_s: float = _doc(60.0, "longest delay before a restart")
    stable_after_s: float = _doc(300.0, "seconds ready after which the backoff starts afresh")
    crashloop_restarts: int = _doc(5, "restarts within crashloop_window_s that mean fatal")
    crashloop_window_s: float = _doc(600.0, "the crash-loop window, seconds")
    stop_timeout_s: float = _doc(10.0, "seconds between SIGTERM and SIGKILL on stop")
    log_max_mb: float = _doc(50.0, "size at which a service log is rotated, MB")
    log_backups: int = _doc(5, "rotated logs kept per service")

    @property
    def log_max_bytes(self) -> int:
        return int(self.log_max_mb * 1024 * 1024)


@dataclass(frozen=True)
class ProxySettings:
    """The LiteLLM proxy (the stack file's ``proxy:`` section; ``key_file`` is ``proxy.auth``)."""

    host: str = _doc("127.0.0.1", "address the LiteLLM proxy binds; keep 127.0.0.1 unless you "
                     "mean it")
    port: int = _doc(4000, "port of the LiteLLM proxy")
    key_file: str = _doc(
        "proxy.key", "file holding the proxy master key (mode 0600), relative to the state folder")
    timeout_s: float = _doc(600.0, "seconds a request to a tier may take before it fails")
    num_retries: int = _doc(1, "retries of a failed request (then fallbacks to other tiers)")
    cors_origins: tuple[str, ...] = _doc(
        (), "web origins (scheme://host[:port]) whose pages may call the proxy from a browser; "
        "empty: every web page is refused (403, no CORS headers)")
    #: ``proxy.tls`` (read by ``stackfile._read_proxy``): serve HTTPS with these PEM files.
    tls_cert_file: str = ""
    tls_key_file: str = ""

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert_file else "http"

    def exposure(self) -> str | None:
        """What a bind beyond loopback exposes (shown by up, status and doctor), or ``None``."""
        if is_loopback(self.host.strip("[]").lower()):
            return None
        where = ("every network this machine is on" if self.host in ("0.0.0.0", "::")
                 else f"the network of {self.host}")
        wire = ("over HTTPS (proxy.tls)" if self.tls_cert_file else
                "over plain HTTP the key and every prompt cross the network unencrypted "
                "(proxy.tls serves HTTPS)")
        return (f"proxy.host is {self.host}: the proxy is reachable from other machines "
                f"({where}); anyone with the key can use every model, and {wire}; bind "
                "127.0.0.1 unless you mean it, and let only the machines that need it through "
                "the firewall (the chat and embeddings ports stay on loopback; "
                "docs/security.md)")
