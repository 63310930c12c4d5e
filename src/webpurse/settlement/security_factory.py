"""The security module the settings choose: the software keystore or a PKCS#11 token.

Apart from :mod:`.security` so that the software module and :mod:`.pkcs11` (which builds on
it) do not import each other. PKCS#11 is imported only when chosen: PyKCS11 is an optional
extra; choosing it without it fails at start-up with that import error.
"""

from __future__ import annotations

from webpurse.settlement.db import SessionFactory
from webpurse.settlement.security import SecurityModule, SoftwareSecurityModule
from webpurse.settlement.settings import Settings


def open_security_module(settings: Settings, session_factory: SessionFactory) -> SecurityModule:
    """The security module the settings choose (``WEBPURSE_SECURITY_MODULE``)."""
    if settings.security_module == "pkcs11":
        from webpurse.settlement.pkcs11 import Pkcs11SecurityModule

        return Pkcs11SecurityModule.from_settings(settings)
    return SoftwareSecurityModule.from_settings(settings, session_factory)
