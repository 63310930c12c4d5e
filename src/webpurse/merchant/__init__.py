"""webpurse.merchant."""
