"""webpurse: pay on a merchant web page with the PBOC 2.0 e-purse on a contactless card."""

__version__ = "0.1.0"
