"""Installs the test network jail in every Python subprocess the tests start."""

import os
import sys

if os.environ.get("WIT_TEST_NET_JAIL") == "1":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        import netjail

        netjail.install()
    finally:
        sys.path.pop(0)
