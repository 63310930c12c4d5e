"""webpurse.reader."""
