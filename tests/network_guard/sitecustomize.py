"""Python imports this at start-up in every process the tests start: conftest puts this folder
first on their PYTHONPATH. It installs the download guard. (The guard has a module of its own:
some Pythons, Debian's and Ubuntu's, import a sitecustomize of their own into the test process.)"""

import download_guard

download_guard.install()
