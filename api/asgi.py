"""gunicorn's entry point: `gunicorn -k asgi mlxsup.api.asgi:app`, with MLXSUP_RUN_DIR set."""
from mlxsup.api.app import config_from_env, create_app
app = create_app(config_from_env())
