"""Where ``webpurse demo --cluster`` keeps its state unless told otherwise.

Its own module so that the demo command's options (:mod:`webpurse.demo_cli`) and the
cluster launcher (:mod:`webpurse.cluster`) share them without importing each other.
"""

DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/webpurse_cluster"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
