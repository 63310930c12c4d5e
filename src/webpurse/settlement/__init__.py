"""webpurse.settlement."""
