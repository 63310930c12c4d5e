"""webpurse.agent."""
