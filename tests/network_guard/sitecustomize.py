"""Loaded at start-up by every Python process the tests start (conftest puts this folder first on
PYTHONPATH), and installed in the test process itself: a download from anywhere but this machine
fails at once, as it would offline, and is recorded in $TEST_DOWNLOAD_LOG, where conftest finds it
and fails the test. So the suite behaves the same online and offline, and never downloads."""

import os
import urllib.error
import urllib.parse
import urllib.request

LOOPBACK = ("127.0.0.1", "localhost", "::1")
real_urlopen = urllib.request.urlopen


def guarded_urlopen(request: "urllib.request.Request | str", *args: object, **kwargs: object) -> object:
    url = getattr(request, "full_url", request)
    if urllib.parse.urlsplit(url).hostname in LOOPBACK:  # a test's own server on this machine
        return real_urlopen(request, *args, **kwargs)
    with open(os.environ["TEST_DOWNLOAD_LOG"], "a") as log:
        log.write(url + "\n")
    raise urllib.error.URLError(f"the tests never download ({url})")


if os.environ.get("TEST_DOWNLOAD_LOG"):
    urllib.request.urlopen = guarded_urlopen
