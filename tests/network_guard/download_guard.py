"""No download from anywhere but this machine: it fails at once, as it would offline, and is
recorded in $TEST_DOWNLOAD_LOG, where conftest finds it and fails the test. Installed in the test
process by conftest, and in every Python process the tests start by sitecustomize.py beside it.
So the suite behaves the same online and offline, and never downloads."""

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


def install() -> None:
    if os.environ.get("TEST_DOWNLOAD_LOG"):
        urllib.request.urlopen = guarded_urlopen
