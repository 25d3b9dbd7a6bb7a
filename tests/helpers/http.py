"""One blocking HTTP GET for the tests (call it through asyncio.to_thread from a running loop)."""

from __future__ import annotations

import urllib.error
import urllib.request


def http_get(url: str, method: str = "GET", timeout_s: float = 5.0) -> tuple[int | None, dict[str, str], bytes]:
    """(status, headers, body); an error status is returned, not raised; (None, {}, b"") if nothing answers."""
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()
    except OSError:
        return None, {}, b""
